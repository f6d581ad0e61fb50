"""Single-beam decoding (greedy or nucleus sampling) with a KV cache, HF `generate` semantics.

The prompt is prefilled once; then one token per row per step in a `lax.while_loop` that ends
when every row has emitted EOS or `max_new_tokens` tokens exist. Each step feeds its token back
(the last feed is wasted but cheaper than a conditional), so the cache holds
`T + max_new_tokens` slots.

`num_return_sequences = r` samples per row repeat each prefilled row `r` times (HF repeats the
prompt) with a key per sample. Per step (HF order): repetition penalty over the row's history, EOS suppression below the
minimum length, then for sampling temperature / top-k / top-p and one categorical draw from the
row's own key stream (`fold_in(row_key, step)`); for greedy the argmax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from xblip_jax.decode import logits as lp

if TYPE_CHECKING:
  from xblip_jax.decode.api import DecodeConfig, Knobs


def head_table(llm) -> Float[Array, "V D"]:
  """The LM head as a `(vocab, hidden)` matrix (the tied embedding, or the kernel transposed).

  XLA's CPU matmul is ~30 % faster with the vocabulary on the leading axis of the weight (a
  `(V, D)` operand is read row by row); `jit_generate` builds this once per model on CPU.
  """
  if llm.lm_head is None:
    return llm.embed_tokens.embedding[...]
  return llm.lm_head.kernel[...].T


def lm_head(llm, hidden: Float[Array, "B D"], table: Float[Array, "V D"] | None = None
            ) -> Float[Array, "B V"]:
  """`llm`'s LM head on final-norm hidden states (float32 logits), via `table` if given."""
  if table is None and llm.lm_head is not None:
    return llm.lm_head(hidden).astype(jnp.float32)
  table = head_table(llm) if table is None else table
  logits = jnp.einsum("bd,vd->bv", hidden, table.astype(hidden.dtype),
                      precision=llm.precision.lax_precision)
  return logits.astype(jnp.float32)


def prefill(llm, inputs_embeds: Float[Array, "B T D"], attention_mask: Int[Array, "B T"],
            extra_slots: int, table: Float[Array, "V D"] | None = None):
  """Runs the prompt once; returns the last position's logits `(B, V)` and the cache.

  Only the last position goes through the LM head (as HF's `logits_to_keep=1`): under `jit` the
  full-sequence logits that `llm` also returns are dead code (the head is most of a small
  model's prefill).
  """
  b, t, _ = inputs_embeds.shape
  cache = llm.init_cache(b, t + max(extra_slots, 0))
  out = llm(inputs_embeds, attention_mask=attention_mask, cache=cache)
  return lm_head(llm, out.hidden_states[:, -1], table), out.cache


def feed(llm, tokens: Int[Array, "R"], cache, table: Float[Array, "V D"] | None = None):
  """One decoding step: feeds each row's last token, returns next logits `(R, V)`, cache."""
  rows = tokens.shape[0]
  out = llm(llm.embed(tokens[:, None]), attention_mask=jnp.ones((rows, 1), jnp.int32),
            cache=cache)
  return lm_head(llm, out.hidden_states[:, -1], table), out.cache


def process(scores: Float[Array, "R V"], history: Int[Array, "R N"], step: Int[Array, ""],
            cfg: "DecodeConfig", knobs: "Knobs") -> Float[Array, "R V"]:
  """Repetition penalty over `history[:, :step]` (+ 4.33's BOS), then min-length EOS mask."""
  valid = jnp.arange(history.shape[1])[None] < step
  seen = lp.seen_tokens(history, valid, scores.shape[-1], cfg.history_extra_ids)
  scores = lp.repetition_penalty(scores, seen, knobs.repetition_penalty)
  return lp.suppress_eos(scores, cfg.eos_id, step < knobs.min_new_tokens)


def choose_next(scores: Float[Array, "R V"], step: Int[Array, ""], keys, cfg: "DecodeConfig",
                knobs: "Knobs") -> tuple[Int[Array, "R"], Float[Array, "R V"]]:
  """Each row's next token from processed scores (argmax, or one nucleus draw from the row's
  key stream at `step`), and the scores it was drawn from (warped when sampling)."""
  if not cfg.do_sample:
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), scores
  scores = lp.warp(scores, temp=knobs.temperature, top_k=cfg.top_k, top_p=knobs.top_p)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return jax.vmap(jax.random.categorical)(step_keys, scores).astype(jnp.int32), scores


def row_keys(key: jax.Array | None, rows: int) -> jax.Array:
  """One PRNG key per row: `key` split `rows` ways, or `key` itself if it already is `rows` keys."""
  if key is None:
    raise ValueError("sampling needs a PRNG key")
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim == (0 if typed else 1):
    return jax.random.split(key, rows)
  if key.shape[0] != rows:
    raise ValueError(f"got {key.shape[0]} keys for {rows} rows")
  return key


def decode(llm, inputs_embeds: Float[Array, "B T D"], attention_mask: Int[Array, "B T"],
           cfg: "DecodeConfig", knobs: "Knobs", key: jax.Array | None = None,
           table: Float[Array, "V D"] | None = None
           ) -> tuple[Int[Array, "B N"], Float[Array, "B"]]:
  """Greedy (`cfg.do_sample` False) or sampled ids `(B * r, max_new_tokens)` and summed
  log-probs, `r = cfg.num_return_sequences` samples per row (adjacent)."""
  b = inputs_embeds.shape[0]
  n, r = cfg.max_new_tokens, cfg.num_return_sequences
  logits, cache = prefill(llm, inputs_embeds, attention_mask, n, table)
  keys = row_keys(key, b) if cfg.do_sample else None
  if r > 1:  # r samples per row from the one prefill; each row's key split r ways
    keys = jax.vmap(lambda k: jax.random.split(k, r))(keys)
    keys = keys.reshape((b * r,) + keys.shape[2:])
    logits, cache, b = jnp.repeat(logits, r, axis=0), cache.repeat_rows(r), b * r
  eos = -1 if cfg.eos_id is None else cfg.eos_id

  def cond(carry):
    step, _, done, _, _, _ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, tokens, done, score, logits, cache = carry
    tok, scores = choose_next(process(logits, tokens, step, cfg, knobs), step, keys, cfg, knobs)
    tok = jnp.where(done, cfg.pad_id, tok)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), tok[:, None], axis=-1)[:, 0]
    score = score + jnp.where(done, 0.0, logp)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
    done = done | (tok == eos)
    # Unconditional (the last call is wasted): a `lax.cond` here makes XLA copy the cache.
    logits, cache = feed(llm, jnp.maximum(tok, 0), cache, table)
    return step + 1, tokens, done, score, logits, cache

  carry = (jnp.zeros((), jnp.int32), jnp.full((b, n), cfg.pad_id, jnp.int32),
           jnp.zeros((b,), jnp.bool_), jnp.zeros((b,), jnp.float32), logits, cache)
  _, tokens, _, score, _, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, score
