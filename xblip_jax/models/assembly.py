"""Where the soft tokens, cues and text go in the LLM input (training layout).

Per example, left to right:
  [prefix with BOS]                            if a prefix is configured
  for each modality, in the order given:
    [cue][soft tokens of that modality]         cue = its tokens, BOS kept or dropped (below)
  [LLM text block]                              instruction, answer, padding (data/text.py)

`layout="single"` (default) puts each modality once, with the cue's BOS dropped exactly where
`generate()` drops it: when clean tokenisation is on and something precedes the cue (a prefix
or an earlier modality). Training and inference then see the same sequence.

`layout="reference_forward"` reproduces LAVIS' training `forward()`: with a prefix and clean
tokenisation each modality contributes `[cue w/o BOS][soft][cue with BOS][soft]` (a missing
`else`; quirk Q03 in docs/quirks.md), otherwise `[cue with BOS][soft]`. The released
`*_improved` Q-Formers were trained this way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from xblip_jax.data.text import IGNORE

LAYOUTS = ("single", "reference_forward")


@dataclasses.dataclass(frozen=True)
class PromptIds:
  """Token ids of the fixed prompt pieces, each tokenised WITH the tokenizer's BOS."""

  prefix: tuple[int, ...] = ()
  cues: tuple[tuple[str, tuple[int, ...]], ...] = ()
  clean_tokenization: bool = True

  def cue(self, modality: str) -> tuple[int, ...]:
    return dict(self.cues).get(modality, ())


def segments(prompt: PromptIds, order: Sequence[str], layout: str,
             use_cues: bool = True) -> list[tuple[str, object]]:
  """The static segment list: ("ids", tuple_of_ids) or ("soft", modality)."""
  if layout not in LAYOUTS:
    raise ValueError(f"assembly layout must be one of {LAYOUTS}, got {layout!r}")
  out: list[tuple[str, object]] = []
  if prompt.prefix:
    out.append(("ids", prompt.prefix))
  for i, m in enumerate(order):
    cue = prompt.cue(m) if use_cues else ()
    if layout == "reference_forward":
      if cue and prompt.prefix and prompt.clean_tokenization:
        out += [("ids", cue[1:]), ("soft", m), ("ids", cue), ("soft", m)]
      else:
        out += [("ids", cue), ("soft", m)]
    else:
      preceded = bool(prompt.prefix) or i > 0
      drop_bos = bool(cue) and preceded and prompt.clean_tokenization
      out += [("ids", cue[1:] if drop_bos else cue), ("soft", m)]
  return [s for s in out if not (s[0] == "ids" and not s[1])]


def assemble(
    embed: Callable[[Int[Array, "B T"]], Float[Array, "B T D"]],
    soft: Mapping[str, Float[Array, "B S D"]],
    text_ids: Int[Array, "B L"],
    text_mask: Int[Array, "B L"],
    text_labels: Int[Array, "B L"] | None,
    prompt: PromptIds,
    order: Sequence[str],
    layout: str = "single",
    use_cues: bool = True,
) -> tuple[Float[Array, "B T D"], Int[Array, "B T"], Int[Array, "B T"] | None]:
  """inputs_embeds, attention_mask and labels of the LLM input (right-padded)."""
  batch = text_ids.shape[0]
  pieces, masks, labels = [], [], []
  for kind, value in segments(prompt, order, layout, use_cues):
    if kind == "ids":
      ids = jnp.broadcast_to(jnp.asarray(value, jnp.int32)[None], (batch, len(value)))
      x = embed(ids)
    else:
      x = soft[value]
    pieces.append(x)
    masks.append(jnp.ones(x.shape[:2], jnp.int32))
    labels.append(jnp.full(x.shape[:2], IGNORE, jnp.int32))
  text_x = embed(text_ids)
  pieces.append(text_x.astype(pieces[0].dtype) if pieces else text_x)
  masks.append(text_mask.astype(jnp.int32))
  inputs = jnp.concatenate([p.astype(text_x.dtype) for p in pieces], axis=1)
  mask = jnp.concatenate(masks, axis=1)
  if text_labels is None:
    return inputs, mask, None
  labels.append(text_labels.astype(jnp.int32))
  return inputs, mask, jnp.concatenate(labels, axis=1)


def shifted_targets(labels: Int[Array, "B T"]) -> Int[Array, "B T"]:
  """The target of position t: `labels[:, t + 1]`, IGNORE at the last position.

  The labels are shifted instead of the logits: a slice of `(B, T, V)` logits is a copy.
  """
  return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)


def token_nll_sum(logits: Float[Array, "... V"], targets: Int[Array, "..."]
                  ) -> tuple[Float[Array, ""], Int[Array, ""]]:
  """(summed cross-entropy, count) over the positions whose target is not IGNORE.

  The target logit is picked with a one-hot select rather than a gather, whose gradient would
  scatter into a zero-filled `(..., V)` buffer; the backward pass is then one elementwise pass.
  """
  valid = targets != IGNORE
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  picked = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  return jnp.sum(jnp.where(valid, lse - picked, 0.0)), valid.sum()


def causal_lm_loss(logits: Float[Array, "B T V"], labels: Int[Array, "B T"]
                   ) -> tuple[Float[Array, ""], Int[Array, ""]]:
  """Mean cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` over supervised tokens.

  A token-level mean over the whole batch, as the reference's HF loss. Returns (loss, count).
  """
  total, count = token_nll_sum(logits, shifted_targets(labels))
  return total / jnp.maximum(count, 1), count


def text_lm_loss(
    hidden: Float[Array, "B T D"],
    text_labels: Int[Array, "B L"],
    head: Callable[[Float[Array, "B N D"]], Float[Array, "B N V"]],
    *,
    buckets: int = 8,
) -> tuple[Float[Array, ""], Int[Array, ""]]:
  """`causal_lm_loss(head(hidden), labels)` of an `assemble`d sequence, with the LM head on
  the positions that carry a label only.

  `hidden` are the final hidden states of the whole sequence, whose last `L` positions are
  the text block; `assemble` labels everything before it IGNORE, so only the `L` positions
  that predict a text token (from the one before the text block to the second last) can be
  supervised: a static slice. Within it, each row's supervised positions are moved to the
  front (a stable per-row sort, so rows stay on their batch shard), and the head (`N x D x V`
  products forward and backward, and the loss' passes over `(B, N, V)`: most of a small LLM's
  step) runs on the first `c` of them, `c` the smallest of `buckets` static capacities
  (`L * k / buckets`) that holds the row with most labels, chosen at run time by `lax.switch`.
  Shapes never depend on the data; the value and gradients are those of the full logits.

  The head's parameters get no gradient (the LLM is frozen; differentiating them raises):
  the gradient of the rows is computed with the loss inside the chosen branch (a custom VJP),
  so the backward pass neither keeps every branch's `(B, c, V)` residuals nor redoes the head.
  """
  t, l = hidden.shape[1], text_labels.shape[1]
  if l > t:
    raise ValueError(f"text block of {l} tokens is longer than the sequence ({t})")
  lo = max(t - l - 1, 0)  # the position predicting the first text token (none without prefix)
  targets = text_labels[:, lo - (t - l - 1):].astype(jnp.int32)
  rows = hidden[:, lo:t - 1]
  valid = targets != IGNORE
  count = valid.sum()
  n = rows.shape[1]
  caps = sorted({-(-n * k // max(buckets, 1)) for k in range(1, max(buckets, 1) + 1)})
  if len(caps) == 1:
    total, _ = token_nll_sum(head(rows), targets)
    return total / jnp.maximum(count, 1), count
  order = jnp.argsort(~valid, axis=1, stable=True)
  rows = jnp.take_along_axis(rows, order[..., None], axis=1)
  targets = jnp.take_along_axis(targets, order, axis=1)
  branch = jnp.searchsorted(jnp.asarray(caps), valid.sum(axis=1).max())
  total = _bucketed_nll_sum(rows, targets, head, caps, branch)
  return total / jnp.maximum(count, 1), count


def _bucketed_nll_sum(rows: Float[Array, "B N D"], targets: Int[Array, "B N"],
                      head: Callable, caps: Sequence[int], branch: Int[Array, ""]
                      ) -> Float[Array, ""]:
  """Summed cross-entropy of `head(rows[:, :caps[branch]])`; custom VJP for `rows` only."""
  n = rows.shape[1]

  def loss_only(c):
    return lambda r: token_nll_sum(head(r[:, :c]), targets[:, :c])[0]

  def with_grad(c):
    def run(r):
      logits, pullback = jax.vjp(head, r[:, :c])
      tg = targets[:, :c]
      total, _ = token_nll_sum(logits, tg)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      onehot = jnp.arange(logits.shape[-1], dtype=tg.dtype) == tg[..., None]
      dlogits = jnp.where((tg != IGNORE)[..., None], probs - onehot, 0.0)
      (drows,) = pullback(dlogits.astype(logits.dtype))
      return total, jnp.pad(drows, ((0, 0), (0, n - c), (0, 0)))
    return run

  @jax.custom_vjp
  def summed(r):
    return jax.lax.switch(branch, [loss_only(c) for c in caps], r)

  def forward(r):
    return jax.lax.switch(branch, [with_grad(c) for c in caps], r)

  summed.defvjp(forward, lambda drows, ct: (ct * drows,))
  return summed(rows)
