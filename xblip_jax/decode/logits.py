"""Next-token score processors with HF `generate` semantics, shape-static for `jax.jit`.

Each function takes scores `(R, V)` (raw logits for greedy/sampling, log-probabilities for beam
search, as HF applies its processors) and returns new scores of the same shape.

- `repetition_penalty`: HF `RepetitionPenaltyLogitsProcessor` - every token id present in the
  row's history is penalised once (`s * p` where `s < 0`, else `s / p`). X-InstructBLIP calls
  `generate(inputs_embeds=...)` without `input_ids`, so the history holds generated tokens only
  (plus the BOS that transformers 4.33 starts `input_ids` with; see `api.py`).
- `suppress_eos`: HF `MinLengthLogitsProcessor` / `MinNewTokensLengthLogitsProcessor`.
- `temperature`, `top_k_filter`, `top_p_filter`: HF's sampling warpers, applied in that order.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

NEG_INF = -jnp.inf


def seen_tokens(history: Int[Array, "R N"], valid: Bool[Array, "R N"], vocab: int,
                extra_ids: Sequence[int] = ()) -> Bool[Array, "R V"]:
  """Which vocabulary ids occur among the valid history tokens of each row.

  Args:
    history: token ids per row.
    valid: which history entries count (e.g. `arange(N) < step`).
    vocab: vocabulary size `V`.
    extra_ids: ids that count as seen in every row (the BOS of transformers 4.33's `input_ids`).

  Returns:
    `(R, V)` mask; ids outside `[0, V)` are ignored.
  """
  rows = history.shape[0]
  ids = jnp.where(valid & (history >= 0) & (history < vocab), history, vocab)
  seen = jnp.zeros((rows, vocab + 1), jnp.bool_)
  seen = seen.at[jnp.arange(rows)[:, None], ids].set(True)[:, :vocab]
  for i in extra_ids:
    if 0 <= i < vocab:
      seen = seen.at[:, i].set(True)
  return seen


def repetition_penalty(scores: Float[Array, "R V"], seen: Bool[Array, "R V"],
                       penalty: Float[Array, ""] | float) -> Float[Array, "R V"]:
  """Divides positive / multiplies negative scores of already seen ids by `penalty` (1 = no-op)."""
  penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
  return jnp.where(seen, penalised, scores)


def suppress_eos(scores: Float[Array, "R V"], eos_id: int | None,
                 active: Bool[Array, ""] | bool) -> Float[Array, "R V"]:
  """Sets the EOS score to -inf while `active` (fewer tokens than the minimum so far)."""
  if eos_id is None:
    return scores
  col = jnp.where(active, NEG_INF, scores[:, eos_id])
  return scores.at[:, eos_id].set(col)


def temperature(scores: Float[Array, "R V"], value: Float[Array, ""] | float
                ) -> Float[Array, "R V"]:
  """HF `TemperatureLogitsWarper` (`value > 0`; dividing by 1.0 is exact, HF skips it)."""
  return scores / value


def top_k_filter(scores: Float[Array, "R V"], k: int, min_keep: int = 1
                 ) -> Float[Array, "R V"]:
  """HF `TopKLogitsWarper`: keeps scores >= the k-th largest (ties kept); k = 0 disables."""
  if k <= 0:
    return scores
  k = min(max(k, min_keep), scores.shape[-1])
  kth = jax.lax.top_k(scores, k)[0][:, -1:]
  return jnp.where(scores < kth, NEG_INF, scores)


def top_p_filter(scores: Float[Array, "R V"], p: Float[Array, ""] | float, min_keep: int = 1
                 ) -> Float[Array, "R V"]:
  """HF `TopPLogitsWarper` (nucleus): drops the least likely ids whose cumulative probability
  (summed from the least likely up) stays <= 1 - p, always keeping the `min_keep` most likely.
  `p = 1` keeps every id of non-zero probability (HF skips the warper then).
  """
  order = jnp.argsort(scores, axis=-1)                       # ascending, as HF sorts
  sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
  remove_sorted = cum <= (1.0 - p)
  vocab = scores.shape[-1]
  remove_sorted = remove_sorted & (jnp.arange(vocab) < vocab - min_keep)[None]
  rows = jnp.arange(scores.shape[0])[:, None]
  remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
  return jnp.where(remove, NEG_INF, scores)


def warp(scores: Float[Array, "R V"], *, temp: Float[Array, ""] | float, top_k: int,
         top_p: Float[Array, ""] | float, min_keep: int = 1) -> Float[Array, "R V"]:
  """The sampling warpers in HF's order: temperature, top-k, top-p."""
  scores = temperature(scores, temp)
  scores = top_k_filter(scores, top_k, min_keep)
  return top_p_filter(scores, top_p, min_keep)
