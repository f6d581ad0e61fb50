"""Jitted step functions: the training step (gradients for trainable state only) and the
evaluation loss (and `_eval_jit`, which jits every evaluation function).

The model is split once into `graphdef`, trainable `params` and frozen `rest` (LLM, encoders);
steps merge them inside `jax.jit`, so the optimizer never sees a frozen parameter. Every step
is jitted with explicit in/out shardings (`StepShardings`); the training step donates params
and optimizer state. Key activations (encoder features, soft tokens, the LLM input, logits) are
constrained by logical names (`sharding.constrain`). The loss runs the LM head on the positions
that can carry a label only (`XInstructBlip.__call__(..., logits=False)`).

Gradient accumulation over `microbatches` scans the batch in slices (rows `i::A`, so that each
device keeps its own rows) and sums token-weighted losses and gradients: the update equals the
full batch's, with a microbatch's activations in memory.

The update is `optim.masked_update`: with one modality per batch, the bridges of modalities
absent from the batch (`order` is static) keep their parameters and AdamW moments bit-identical
instead of drifting on stale momentum and weight decay; a shared Q-Former always updates
(docs/quirks.md Q37).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xblip_jax import sharding
from xblip_jax.models import assembly
from xblip_jax.models.encoders import registry
from xblip_jax.models.xblip import XInstructBlip
from xblip_jax.train import optim

# Logical names of the encoder features / inputs entering the bridge, by rank.
_MEDIA_AXES = {2: ("batch", None), 3: ("batch", None, None), 4: ("batch", None, None, None),
               5: ("batch", None, None, None, None)}


@dataclasses.dataclass(frozen=True)
class StepShardings:
  """Shardings of the step arguments: state trees, and one sharding for every batch array."""

  params: Any
  opt_state: Any
  rest: Any
  mesh: jax.sharding.Mesh

  @property
  def batch(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, mesh, rules):
  """Optimizer-state shardings: moments follow their parameters' logical names, counters are
  replicated (optax keeps the `nnx.Param` metadata on the moments it builds)."""
  return sharding.named_shardings(jax.eval_shape(tx.init, abstract_params), mesh, rules)


def soft_tokens(model: XInstructBlip, batch: dict, order: Sequence[str], *,
                deterministic: bool, rngs: nnx.Rngs | None = None) -> dict:
  out = {}
  for m in order:
    feats = batch.get(f"{m}_features")
    if feats is None:
      feats = registry.encode(m, model.encoders[m], batch[m])
    feats = sharding.constrain(feats, _MEDIA_AXES[feats.ndim])
    soft = model.soft_tokens(m, feats, batch.get(f"{m}_qformer_ids", batch["qformer_ids"]),
                             batch.get(f"{m}_qformer_mask", batch["qformer_mask"]),
                             deterministic=deterministic, rngs=rngs)
    out[m] = sharding.constrain(soft, ("batch", "seq", "embed"))
  return out


def lm_loss(model: XInstructBlip, batch: dict, order: Sequence[str],
            prompt: assembly.PromptIds, *, deterministic: bool, rngs: nnx.Rngs | None = None):
  """(token-mean loss, supervised token count) of one batch: `XInstructBlip.__call__` without
  full logits (the LM head runs on the label-carrying text positions only; same value and
  gradients as `causal_lm_loss` on the full logits).

  The towers' remat (LLM `remat_policy`, EVA `remat`, `models/remat.py`) works on a model
  merged inside `jax.value_and_grad`.
  """
  soft = soft_tokens(model, batch, order, deterministic=deterministic, rngs=rngs)
  out = model(soft, batch["llm_text_ids"], batch["llm_text_mask"], batch["llm_text_labels"],
              prompt, order, logits=False)
  return out.loss, out.num_tokens


def _split_microbatches(batch: dict, n: int) -> dict:
  """(B, ...) -> (n, B/n, ...) taking rows i::n, so a device's rows stay on that device."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches")
    y = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(y, (None, "batch") + (None,) * (x.ndim - 1))
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, prompt: assembly.PromptIds, *,
                    shardings: StepShardings | None = None, microbatches: int = 1) -> Callable:
  """`step(params, opt_state, rest, batch, rng, order) -> (params, opt_state, metrics)`.

  With `shardings`, the step is jitted with explicit in/out shardings (call it under
  `jax.set_mesh(mesh)`); without, shardings follow the inputs (single device).
  """

  def loss_fn(params, rest, batch, rng, order):
    model = nnx.merge(graphdef, params, rest)
    return lm_loss(model, batch, order, prompt, deterministic=False,
                   rngs=nnx.Rngs(dropout=rng))

  def summed(params, rest, batch, rng, order):
    loss, count = loss_fn(params, rest, batch, rng, order)
    return loss * count, count

  def gradients(params, rest, batch, rng, order):
    if microbatches == 1:
      (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, rest, batch, rng, order)
      return loss, count, grads

    def body(carry, xs):
      grads, total, count = carry
      micro, i = xs
      (s, c), g = jax.value_and_grad(summed, has_aux=True)(
          params, rest, micro, jax.random.fold_in(rng, i), order)
      grads = jax.tree.map(jnp.add, grads, g)
      if shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, shardings.params)
      return (grads, total + s, count + c), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grads, total, count), _ = jax.lax.scan(
        body, init, (_split_microbatches(batch, microbatches), jnp.arange(microbatches)))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return total / denom, count, grads

  def step(params, opt_state, rest, batch, rng, order):
    loss, tokens, grads = gradients(params, rest, batch, rng, order)
    params, opt_state = optim.masked_update(tx, grads, opt_state, params, order)
    return params, opt_state, {"loss": loss, "tokens": tokens,
                               "grad_norm": optax.global_norm(grads)}

  if shardings is None:
    return jax.jit(step, static_argnums=(5,), donate_argnums=(0, 1))
  s = shardings
  return jax.jit(step, static_argnums=(5,), donate_argnums=(0, 1),
                 in_shardings=(s.params, s.opt_state, s.rest, s.batch, s.replicated),
                 out_shardings=(s.params, s.opt_state, s.replicated))


def _eval_jit(fn, shardings: StepShardings | None, static_argnums: tuple[int, ...] = (3,)):
  """`fn(params, rest, batch, *static)` jitted. Evaluation batches keep the sharding they were
  placed with (`None`): their row count need not divide the batch shards. Outputs are
  replicated, so every host can read them."""
  if shardings is None:
    return jax.jit(fn, static_argnums=static_argnums)
  s = shardings
  return jax.jit(fn, static_argnums=static_argnums, in_shardings=(s.params, s.rest, None),
                 out_shardings=s.replicated)


def make_eval_loss(graphdef, prompt: assembly.PromptIds,
                   shardings: StepShardings | None = None) -> Callable:
  """`eval_loss(params, rest, batch, order) -> (summed token loss, token count)`."""

  def eval_loss(params, rest, batch, order):
    model = nnx.merge(graphdef, params, rest)
    loss, count = lm_loss(model, batch, order, prompt, deterministic=True)
    return loss * count, count

  return _eval_jit(eval_loss, shardings)


class NonFiniteLossError(FloatingPointError):
  """A training loss was NaN or infinite; the message names the step."""


def check_finite(losses: Sequence[tuple[int, Any]]) -> None:
  """Raises `NonFiniteLossError` naming the first step whose loss is not finite.

  Args:
    losses: (step, scalar device array) pairs, fetched together (one host sync).
  """
  if not losses:
    return
  values = np.asarray(jax.device_get([v for _, v in losses]), np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    step, value = losses[int(bad[0])][0], values[int(bad[0])]
    raise NonFiniteLossError(f"non-finite loss {value} at step {step}; no checkpoint after "
                             "the last finite step was written, a restart resumes from it")

