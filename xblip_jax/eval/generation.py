"""Answers for evaluation batches with a task's decoding settings (beam search, penalties).

The multimodal prompt of training (`assembly.assemble`, single layout: soft tokens, cues, the
left-padded instruction), decoded by `decode.api.generate` with the task's `DecodeConfig`,
whose token ids are set to the run's tokenizer. One compiled program per (modality order,
decoding settings).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx

from xblip_jax.decode.api import DecodeConfig
from xblip_jax.decode.api import generate as decode_generate
from xblip_jax.models import assembly
from xblip_jax.train.step import StepShardings, _eval_jit, soft_tokens


def for_tokenizer(cfg: DecodeConfig, tok, max_new_tokens: int = 0,
                  num_beams: int = 0) -> DecodeConfig:
  """`cfg` with the tokenizer's BOS/EOS/pad ids; optional caps on length and beams (demo)."""
  changes = dict(bos_id=tok.generation_bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  if max_new_tokens:
    changes["max_new_tokens"] = min(cfg.max_new_tokens, max_new_tokens)
    changes["min_new_tokens"] = min(cfg.min_new_tokens, changes["max_new_tokens"])
  if num_beams:
    changes["num_beams"] = num_beams
  return dataclasses.replace(cfg, **changes)


def make_task_generate(graphdef, prompt: assembly.PromptIds,
                       shardings: StepShardings | None = None) -> Callable:
  """`generate(params, rest, batch, order, cfg) -> ids (B, max_new_tokens)` (EOS, then pad)."""

  def generate(params, rest, batch, order, cfg):
    model = nnx.merge(graphdef, params, rest)
    soft = soft_tokens(model, batch, order, deterministic=True)
    embeds, mask, _ = assembly.assemble(model.llm.embed, soft, batch["prompt_ids"],
                                        batch["prompt_mask"], None, prompt, order,
                                        layout="single", use_cues=model.cfg.use_cues)
    ids, _ = decode_generate(model.llm, embeds, mask, cfg)
    return ids

  return _eval_jit(generate, shardings, static_argnums=(3, 4))
