"""Beam search (and beam sampling) with a KV cache, following HF `generate` (see `api.py`).

The prompt is prefilled once for `B` rows; the cache is then repeated `K = num_beams` times and
its generated slots are reordered by parent beam after every step. Per step and batch row:

1. log-softmax of each beam's logits, processors (repetition penalty over the beam's history,
   min-length EOS mask), plus the beam's running score;
2. the top `2K` of the `K * V` continuations (beam sampling: `2K` drawn without replacement by
   Gumbel-top-k from the warped scores, then sorted, as HF 4.33's `beam_sample`);
3. EOS continuations ranked in the first `K` become finished hypotheses with score
   `sum_logprobs / length ** length_penalty`; the finished set keeps the best `K`;
4. the first `K` non-EOS continuations are the next running beams;
5. a row stops once it holds `K` finished hypotheses and (early_stopping False) the best
   attainable score cannot beat the worst of them.

At the maximum length the running beams are finalised too (4.33: the `K` running beams unless
the row stopped; 5: the `K` best-ranked continuations). A stopped row adds nothing more.

Beam sampling follows 4.33 for either `hf_version` (transformers 5 warps each beam's
log-probabilities before adding the running score and does not sort the draws); sampled
sequences cannot match torch's token for token anyway (different random streams).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from xblip_jax.decode import logits as lp
from xblip_jax.decode.sampling import feed, prefill, process, row_keys

if TYPE_CHECKING:
  from xblip_jax.decode.api import DecodeConfig, Knobs

NEG = -1e9  # HF's score of the K-1 initial copies of the prompt beam


@struct.dataclass
class BeamState:
  """Beam search carry (B rows, K beams, N new tokens).

  Attributes:
    seqs: running beams' tokens `(B, K, N)` (pad after the current step).
    run: running beams' summed log-probs `(B, K)`.
    fin_seqs: finished hypotheses `(B, K, N)`.
    fin_scores: their length-normalised scores `(B, K)`.
    fin_valid: which finished slots hold a hypothesis `(B, K)`.
    done: rows that stopped `(B,)`.
  """

  seqs: Int[Array, "B K N"]
  run: Float[Array, "B K"]
  fin_seqs: Int[Array, "B K N"]
  fin_scores: Float[Array, "B K"]
  fin_valid: Bool[Array, "B K"]
  done: Bool[Array, "B"]


def _take(x, idx):
  """`x[b, idx[b, j], ...]` for `x (B, M, ...)`, `idx (B, J)`."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _merge(state: BeamState, seqs, scores, add) -> BeamState:
  """Adds candidates `add` (with normalised `scores`) to the finished set, keeping the best K."""
  k = state.fin_scores.shape[1]
  all_scores = jnp.concatenate([jnp.where(state.fin_valid, state.fin_scores, -jnp.inf),
                                jnp.where(add, scores, -jnp.inf)], axis=1)
  all_valid = jnp.concatenate([state.fin_valid, add], axis=1)
  all_seqs = jnp.concatenate([state.fin_seqs, seqs], axis=1)
  # Ties keep the older hypothesis first (HF 4.33 replaces only on a strictly better score).
  _, best = jax.lax.top_k(all_scores, k)
  return state.replace(fin_seqs=_take(all_seqs, best), fin_scores=_take(all_scores, best),
                       fin_valid=_take(all_valid, best))


def _norm(scores, length, knobs: "Knobs"):
  return scores / jnp.asarray(length, jnp.float32) ** knobs.length_penalty


def _advance(step, logits, state: BeamState, keys, cfg: "DecodeConfig", knobs: "Knobs"):
  """One beam step from the running beams' logits `(B*K, V)`; returns state, parents, tokens."""
  b, k, n = state.seqs.shape
  vocab = logits.shape[-1]
  c = 2 * k
  logp = process(jax.nn.log_softmax(logits, axis=-1), state.seqs.reshape(b * k, n), step, cfg,
                 knobs)
  acc = logp + state.run.reshape(b * k, 1)
  if cfg.do_sample:
    acc = lp.warp(acc, temp=knobs.temperature, top_k=cfg.top_k, top_p=knobs.top_p, min_keep=2)
    flat = acc.reshape(b, k * vocab)
    step_keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(keys)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (k * vocab,)))(step_keys)
    _, idx = jax.lax.top_k(flat + gumbel, c)
    vals = jnp.take_along_axis(flat, idx, axis=1)
    order = jnp.argsort(-vals, axis=1, stable=True)
    vals, idx = _take(vals, order), _take(idx, order)
  else:
    vals, idx = jax.lax.top_k(acc.reshape(b, k * vocab), c)
  parent, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
  is_eos = (jnp.zeros_like(tok, jnp.bool_) if cfg.eos_id is None else tok == cfg.eos_id)
  rank = jnp.arange(c)[None]
  cand_seqs = jax.lax.dynamic_update_slice_in_dim(_take(state.seqs, parent), tok[..., None],
                                                 step, axis=2)
  last = step == n - 1
  v433 = cfg.hf_version == "4.33"
  live = ~state.done[:, None]

  # Finished hypotheses of this step. Both versions give an EOS-ended hypothesis length
  # step + 1: 4.33 counts its BOS and the tokens before EOS, 5 the new tokens with the EOS.
  hits = is_eos if v433 else is_eos | last
  state = _merge(state, cand_seqs, _norm(vals, step + 1, knobs), hits & (rank < k) & live)

  # Next running beams: the first K non-EOS continuations in rank order.
  sel = jnp.argsort(jnp.where(is_eos, rank + c, rank), axis=1)[:, :k]
  run, seqs, parents, toks = _take(vals, sel), _take(cand_seqs, sel), _take(parent, sel), \
      _take(tok, sel)

  full = jnp.all(state.fin_valid, axis=1)
  worst = jnp.min(jnp.where(state.fin_valid, state.fin_scores, jnp.inf), axis=1)
  if v433:  # best candidate of the step (EOS included) at length BOS + step + 1
    hopeless = worst >= _norm(vals[:, 0], step + 2, knobs)
  else:  # best running beam at length step + 1
    hopeless = ~(_norm(run[:, 0], step + 1, knobs) > worst)
  done = state.done | (full & (hopeless | knobs.early_stopping))
  if v433:  # `finalize`: open beams cut at the maximum length, length BOS + N
    add = jnp.broadcast_to(last & ~done[:, None], run.shape)
    state = _merge(state, seqs, _norm(run, step + 2, knobs), add)
  state = state.replace(seqs=seqs, run=run, done=done)
  return state, parents, toks


def _reorder(cache, rows: Int[Array, "R"], start: int):
  """Gathers each row's parent beam into the cache slots from `start` (the generated tokens).

  Slots before `start` hold the prompt, identical for all beams of a batch row (and parents
  never cross batch rows), and the key mask is the same for every beam: neither needs moving.
  """
  def gen(x):  # (R, KV, S, Dh)
    return x.at[:, :, start:].set(jnp.take(x[:, :, start:], rows, axis=0))

  return cache.map_kv(gen)


def beam_search(llm, inputs_embeds: Float[Array, "B T D"], attention_mask: Int[Array, "B T"],
                cfg: "DecodeConfig", knobs: "Knobs", key: jax.Array | None = None,
                table: Float[Array, "V D"] | None = None
                ) -> tuple[Int[Array, "B N"], Float[Array, "B"]]:
  """The best `n = cfg.num_return_sequences` hypotheses per row `(B * n, max_new_tokens)` (EOS
  kept, then pad; best first) and their HF scores `(B * n,)`."""
  b, t, _ = inputs_embeds.shape
  k, n = cfg.num_beams, cfg.max_new_tokens
  logits, cache = prefill(llm, inputs_embeds, attention_mask, n, table)
  keys = row_keys(key, b) if cfg.do_sample else None
  # The prompt is shared by a row's beams: repeat the prefilled cache, not the prefill.
  cache = cache.repeat_rows(k)
  seqs = jnp.full((b, k, n), cfg.pad_id, jnp.int32)
  state = BeamState(
      seqs=seqs, run=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG), fin_seqs=seqs,
      fin_scores=jnp.full((b, k), -jnp.inf, jnp.float32),
      fin_valid=jnp.zeros((b, k), jnp.bool_), done=jnp.zeros((b,), jnp.bool_))
  offsets = (jnp.arange(b) * k)[:, None]

  def cond(carry):
    step, state, _, _ = carry
    return (step < n) & ~jnp.all(state.done)

  def body(carry):
    step, state, logits, cache = carry
    state, parents, toks = _advance(step, logits, state, keys, cfg, knobs)

    # Unconditional (the last call is wasted): a `lax.cond` here makes XLA copy the cache.
    cache = _reorder(cache, (parents + offsets).reshape(-1), t)
    logits, cache = feed(llm, toks.reshape(-1), cache, table)
    return step + 1, state, logits, cache

  carry = (jnp.zeros((), jnp.int32), state, jnp.repeat(logits, k, axis=0), cache)
  _, state, _, _ = jax.lax.while_loop(cond, body, carry)
  # The best `num_return_sequences` hypotheses of each row, best first (ties: older first).
  scores = jnp.where(state.fin_valid, state.fin_scores, -jnp.inf)
  best = jnp.argsort(-scores, axis=1, stable=True)[:, :cfg.num_return_sequences]
  return _take(state.fin_seqs, best).reshape(-1, n), _take(scores, best).reshape(-1)
