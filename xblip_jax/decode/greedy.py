"""Greedy decoding with a KV cache: prefill the multimodal prompt once, then one token a step.

The prompt is left-padded (padding between the media block and the instruction, as the
reference's `generate`), so rotary positions follow `cumsum(mask) - 1` and every row's output
equals its output decoded alone. A thin wrapper over `xblip_jax.decode.sampling.decode` (no
repetition penalty, no minimum length); see `xblip_jax.decode.api.generate` for the reference's
beam search and processors.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from xblip_jax.decode.api import DecodeConfig, generate
from xblip_jax.models.llm.llama import Llama


def greedy_decode(llm: Llama, inputs_embeds: Float[Array, "B T D"],
                  attention_mask: Int[Array, "B T"], *, max_new_tokens: int, eos_id: int,
                  pad_id: int) -> Int[Array, "B N"]:
  """Generated ids `(B, max_new_tokens)`; after a row's EOS the rest of it is `pad_id`."""
  cfg = DecodeConfig(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                     repetition_penalty=1.0, eos_id=eos_id, pad_id=pad_id)
  return generate(llm, inputs_embeds, attention_mask, cfg)[0]
