"""Text side of a training example: Q-Former instruction ids and the LLM text block.

The LLM text block is what LAVIS' `concat_text_input_output` builds, at a fixed length so that
every batch has one shape: per row `[instruction (+postfix)][answer + </s>][padding]`, with
labels -100 on the instruction and the padding. Truncation follows the reference: the
instruction keeps its END (left truncation at `max_txt_len`), the answer keeps its START (right
truncation at `max_output_txt_len` tokens counted with the BOS that is then dropped). Labels are
derived from the same token list as the ids, so truncation can never misalign them.

The multimodal part (prefix, cues, soft tokens) is assembled by the model at embedding level:
see `xblip_jax/models/assembly.py`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xblip_jax.data.tokenizers import LlmTokenizer, QFormerTokenizer

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Lengths and prompt format of the text side (reference defaults)."""

  max_txt_len: int = 128            # instruction tokens fed to the LLM (left-truncated)
  max_output_txt_len: int = 256     # answer tokens incl. the dropped BOS (right-truncated)
  qformer_max_len: int = 128        # Q-Former instruction tokens incl. [CLS]/[SEP]
  llm_text_len: int = 160           # fixed LLM text block length per example (padding)
  prefix: str = ""                  # e.g. "USER: " (tokenised with BOS)
  postfix: str = ""                 # e.g. "\nASSISTANT:" (appended to the instruction)
  clean_tokenization: bool = True   # no BOS on the instruction; cues lose their leading space


def encode_instruction(tok: LlmTokenizer, text_input: str, cfg: TextConfig) -> list[int]:
  ids = tok.encode(text_input + cfg.postfix, add_bos=not cfg.clean_tokenization)
  return ids[-cfg.max_txt_len:] if len(ids) > cfg.max_txt_len else ids


def encode_answer(tok: LlmTokenizer, text_output: str, cfg: TextConfig) -> list[int]:
  ids = tok.encode(text_output + "</s>", add_bos=True)[:cfg.max_output_txt_len]
  return ids[1:]  # the reference drops the BOS of every target


def llm_text_block(instruction: list[int], answer: list[int], length: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """ids/mask/labels of `[instruction][answer][pad...]` at a fixed `length`.

  When the two do not fit, the instruction loses tokens from its start first (as the
  reference's left truncation would), then the answer from its end; never silently.
  """
  overflow = len(instruction) + len(answer) - length
  if overflow > 0:
    cut = min(overflow, len(instruction))
    instruction = instruction[cut:]
    answer = answer[:length - len(instruction)]
  n_in, n_out = len(instruction), len(answer)
  ids = np.full((length,), pad_id, np.int32)
  ids[:n_in] = instruction
  ids[n_in:n_in + n_out] = answer
  mask = np.zeros((length,), np.int32)
  mask[:n_in + n_out] = 1
  labels = np.full((length,), IGNORE, np.int32)
  labels[n_in:n_in + n_out] = answer
  return {"llm_text_ids": ids, "llm_text_mask": mask, "llm_text_labels": labels}


def qformer_text(tok: QFormerTokenizer, text: str, length: int) -> dict[str, np.ndarray]:
  ids = tok.encode(text)[:length]
  out = np.full((length,), tok.pad_id, np.int32)
  out[:len(ids)] = ids
  mask = np.zeros((length,), np.int32)
  mask[:len(ids)] = 1
  return {"qformer_ids": out, "qformer_mask": mask}


class TextEncoder:
  """Turns (instruction, answer) into the fixed-shape arrays of one training example."""

  def __init__(self, llm_tok: LlmTokenizer, qformer_tok: QFormerTokenizer, cfg: TextConfig):
    self.llm_tok, self.qformer_tok, self.cfg = llm_tok, qformer_tok, cfg

  def __call__(self, text_input: str, text_output: str,
               qformer_input: str | None = None) -> dict[str, np.ndarray]:
    cfg = self.cfg
    instruction = encode_instruction(self.llm_tok, text_input, cfg)
    answer = encode_answer(self.llm_tok, text_output, cfg)
    out = llm_text_block(instruction, answer, cfg.llm_text_len, self.llm_tok.pad_id)
    out.update(qformer_text(self.qformer_tok, text_input if qformer_input is None
                            else qformer_input, cfg.qformer_max_len))
    return out

  def prompt(self, text_input: str, length: int) -> dict[str, np.ndarray]:
    """A generation prompt, LEFT-padded to `length` (pads sit between media and prompt)."""
    ids = encode_instruction(self.llm_tok, text_input, self.cfg)[-length:]
    out_ids = np.full((length,), self.llm_tok.pad_id, np.int32)
    mask = np.zeros((length,), np.int32)
    if ids:
      out_ids[length - len(ids):] = ids
      mask[length - len(ids):] = 1
    out = {"prompt_ids": out_ids, "prompt_mask": mask}
    out.update(qformer_text(self.qformer_tok, text_input, self.cfg.qformer_max_len))
    return out
