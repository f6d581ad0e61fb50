"""Greedy decoding with a KV cache: prefill the multimodal prompt once, then one token a step.

The prompt is left-padded (padding between the media block and the instruction, as the
reference's `generate`), so rotary positions follow `cumsum(mask) - 1` and every row's output
equals its output decoded alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from xblip_jax.models.llm.llama import Llama


def greedy_decode(llm: Llama, inputs_embeds: Float[Array, "B T D"],
                  attention_mask: Int[Array, "B T"], *, max_new_tokens: int, eos_id: int,
                  pad_id: int) -> Int[Array, "B N"]:
  """Generated ids `(B, max_new_tokens)`; after a row's EOS the rest of it is `pad_id`."""
  b, t, _ = inputs_embeds.shape
  cache = llm.init_cache(b, t + max_new_tokens)
  out = llm(inputs_embeds, attention_mask=attention_mask, cache=cache)
  first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = first == eos_id

  def step(i, carry):
    tokens, done, cache, last = carry
    res = llm(llm.embed(last[:, None]), attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache)
    nxt = jnp.argmax(res.logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    tokens = tokens.at[:, i].set(nxt)
    return tokens, done | (nxt == eos_id), res.cache, nxt

  tokens, _, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (tokens, done, out.cache, first))
  return tokens
