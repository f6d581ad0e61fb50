"""Token-by-token greedy / sampled decoding, for printing an answer while it is produced.

`sampling.decode` runs the whole answer inside one `lax.while_loop`, so nothing reaches the host
before the last token. Here the same computation is cut at token boundaries: one jitted prefill
(the prompt into a KV cache of `T + max_new_tokens` slots, as `sampling.decode` sizes it), then
one jitted step per token that applies the same processors (`sampling.process`, `logits.warp`),
draws from the same per-row key stream (`fold_in(row_key, step)`) and feeds the token back. The
streamed tokens are therefore those of `api.generate` / `api.jit_generate` for the same
settings, which `tests/test_generate_mode.py` checks.

Beam search has no stream: a hypothesis can be overtaken until the end, so it is decoded whole
(`api.jit_generate`).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from xblip_jax.decode import sampling
from xblip_jax.decode.api import DecodeConfig


@functools.lru_cache(maxsize=16)
def _programs(graphdef, static: DecodeConfig, compiler_options: tuple
              ) -> tuple[Callable, Callable]:
  """Jitted (prefill, step) for one model structure and one compile-time config."""
  opts = dict(compiler_options) or None
  eos = -1 if static.eos_id is None else static.eos_id

  def prefill(state, embeds, mask, table):
    llm = nnx.merge(graphdef, state)
    b = embeds.shape[0]
    logits, cache = sampling.prefill(llm, embeds, mask, static.max_new_tokens, table)
    history = jnp.full((b, static.max_new_tokens), static.pad_id, jnp.int32)
    return jnp.zeros((), jnp.int32), history, jnp.zeros((b,), jnp.bool_), logits, cache

  def step(state, carry, keys, knobs, table):
    llm = nnx.merge(graphdef, state)
    i, history, done, logits, cache = carry
    scores = sampling.process(logits, history, i, static, knobs)
    tok = jnp.where(done, static.pad_id, sampling.choose_next(scores, i, keys, static, knobs)[0])
    history = jax.lax.dynamic_update_slice_in_dim(history, tok[:, None], i, axis=1)
    done = done | (tok == eos)
    logits, cache = sampling.feed(llm, jnp.maximum(tok, 0), cache, table)
    return tok, (i + 1, history, done, logits, cache)

  return (jax.jit(prefill, compiler_options=opts),
          jax.jit(step, donate_argnums=(1,), compiler_options=opts))


class Streamer:
  """`streamer(inputs_embeds, attention_mask, key=None)` yields each step's tokens `(B,)`.

  Rows that finished get `cfg.pad_id`; the iteration ends when every row has emitted EOS or
  `max_new_tokens` steps were taken. Arguments as `api.jit_generate` (`head_table`: the
  `(vocab, hidden)` copy of the LM head, default on CPU; use the same setting as the batch
  decoder being compared with, the two LM-head products may round differently).
  """

  def __init__(self, llm, cfg: DecodeConfig, compiler_options: dict | None = None,
               head_table: bool | None = None):
    if cfg.num_beams != 1:
      raise ValueError(f"streaming decodes one beam; num_beams={cfg.num_beams} needs the whole "
                       "search first (use decode.api.jit_generate)")
    if getattr(cfg, "num_return_sequences", 1) != 1:
      raise ValueError("streaming prints one answer per row (num_return_sequences=1)")
    self.cfg = cfg
    graphdef, self._state = nnx.split(llm)
    self._prefill, self._step = _programs(graphdef, cfg.static_part(),
                                          tuple(sorted((compiler_options or {}).items())))
    self._knobs = cfg.knobs()
    use_table = jax.default_backend() == "cpu" if head_table is None else head_table
    self._table = jnp.array(sampling.head_table(llm)) if use_table else None

  def __call__(self, inputs_embeds: Float[Array, "B T D"], attention_mask: Int[Array, "B T"],
               key: jax.Array | None = None) -> Iterator[np.ndarray]:
    cfg = self.cfg
    keys = sampling.row_keys(key, inputs_embeds.shape[0]) if cfg.do_sample else None
    carry = self._prefill(self._state, inputs_embeds, attention_mask, self._table)
    done = np.zeros((inputs_embeds.shape[0],), bool)
    tok, carry = self._step(self._state, carry, keys, self._knobs, self._table)
    for i in range(cfg.max_new_tokens):
      # Queue the next step before reading this one, so the host prints while it runs.
      nxt = (self._step(self._state, carry, keys, self._knobs, self._table)
             if i + 1 < cfg.max_new_tokens else None)
      host = np.asarray(tok)
      yield host
      if cfg.eos_id is not None:
        done |= host == cfg.eos_id
      if done.all() or nxt is None:
        return
      tok, carry = nxt
