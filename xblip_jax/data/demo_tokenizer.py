"""A small LLaMA-style SentencePiece tokenizer trained from the demo's own text.

Same conventions as LLaMA's (`<unk>`=0, `<s>`=1, `</s>`=2, BPE with byte fallback), so the
demo exercises exactly the code paths a real Vicuna tokenizer takes. Training takes
milliseconds and is deterministic (one thread).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


def train_demo_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 512) -> Path:
  """Trains on `texts` and writes `path` (a `tokenizer.model`); returns the path."""
  path = Path(path)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sorted(set(texts))), model_writer=buf, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
      num_threads=1, split_digits=True, minloglevel=2)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
  return path
