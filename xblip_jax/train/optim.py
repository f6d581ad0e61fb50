"""Optimizer and learning-rate schedule of the reference, in optax.

LAVIS `linear_warmup_cosine_lr` (iteration runner): during inner epoch 0 the rate rises linearly
from `warmup_lr` to `init_lr` over `warmup_steps` iterations and then stays at `init_lr`; from
inner epoch e >= 1 on it is constant within the epoch at
`min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * e / num_epochs))`.
AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 on every parameter with ndim >= 2 (query tokens
included; biases and norms excluded), no gradient clipping unless configured.

Multi-modality runs (one modality per batch) update with `masked_update`: the bridges of
modalities absent from the batch keep their parameters and optimizer moments bit-identical,
as if the step had not happened for them. A plain AdamW step would move them anyway (momentum
from earlier batches, weight decay on zero gradients), which undoes their training between
the batches of their own modality. The reference trains one modality per run, where this never
arises (docs/quirks.md Q37). Adam's bias correction counts, like torch's per-parameter `step`,
only the updates a bridge has had (`scale_by_grouped_adam`), while the rate schedule follows the
global step (LAVIS' scheduler): with a global count a bridge seen in a fraction p of the batches
is corrected for steps its moments never saw, and its step size runs ~1/sqrt(p) too large for
thousands of steps. `optim.grad_accum_steps > 1` (optax `MultiSteps`) cannot be masked
this way (its accumulator would mix modalities across steps), so such a batch is a config
error; `train.microbatches` accumulates inside one step and is fine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from xblip_jax.config_utils import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  init_lr: float = 1e-5
  min_lr: float = 0.0
  warmup_lr: float = 1e-8
  warmup_steps: int = 1000
  iters_per_epoch: int = 5000
  num_epochs: int = 13
  weight_decay: float = 0.05
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float = 0.0    # 0 = off (the reference does not clip)
  grad_accum_steps: int = 1


def lavis_schedule(cfg: OptimConfig) -> optax.Schedule:
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * step / max(cfg.warmup_steps, 1)
    warm = jnp.minimum(warm, cfg.init_lr)
    epoch = jnp.floor(step / cfg.iters_per_epoch)
    cosine = cfg.min_lr + (cfg.init_lr - cfg.min_lr) * 0.5 * (
        1.0 + jnp.cos(math.pi * epoch / max(cfg.num_epochs, 1)))
    return jnp.where(epoch < 1, warm, cosine)

  return schedule


def decay_mask(params):
  """Weight decay on parameters with ndim >= 2 (the reference's param groups)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  # optax.adamw, with the Adam part counting each bridge's own updates.
  parts += [scale_by_grouped_adam(cfg.b1, cfg.b2, cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(lavis_schedule(cfg))]
  tx = optax.chain(*parts)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx


# Top-level bridge children keyed by modality name (`models/xblip.py`); "shared" (a shared
# Q-Former) serves every modality.
MODALITY_KEYED = ("ln", "qformer", "query_tokens", "llm_proj", "encoder_proj")
SHARED_KEY = "shared"


def _key(k) -> Any:
  return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


ALL_GROUP = "_all"  # leaves that every batch trains (shared Q-Former, anything not keyed)


def leaf_group(path) -> str:
  """The modality whose batches train a leaf, or `ALL_GROUP`."""
  keys = [_key(k) for k in path]
  if len(keys) > 1 and keys[0] in MODALITY_KEYED and keys[1] != SHARED_KEY:
    return str(keys[1])
  return ALL_GROUP


def _groups(params) -> list[str]:
  return sorted({leaf_group(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]})


class ScaleByGroupedAdamState(NamedTuple):
  """`optax.ScaleByAdamState` with one update count per leaf group instead of one in all."""

  count: dict[str, jax.Array]  # group -> int32 updates so far
  mu: Any
  nu: Any


def scale_by_grouped_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """`optax.scale_by_adam` whose bias correction uses each leaf group's own count.

  Every call counts for every group (so with all groups in every batch it is exactly
  `scale_by_adam`); `masked_update` then restores the counts of absent groups along with
  their moments, so a bridge's count is the number of batches that trained it, as torch's
  per-parameter `step` of AdamW is (LAVIS leaves an unused bridge's `grad` None).
  """

  def init(params):
    zeros = lambda p: jnp.zeros_like(p)
    return ScaleByGroupedAdamState(
        count={g: jnp.zeros([], jnp.int32) for g in _groups(params)},
        mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * (g * g), updates, state.nu)
    count = {g: optax.safe_increment(c) for g, c in state.count.items()}

    def scaled(path, m, v):
      c = count[leaf_group(path)]
      m_hat = m / (1 - b1 ** c).astype(m.dtype)
      v_hat = v / (1 - b2 ** c).astype(v.dtype)
      return m_hat / (jnp.sqrt(v_hat) + eps)

    return (jax.tree_util.tree_map_with_path(scaled, mu, nu),
            ScaleByGroupedAdamState(count=count, mu=mu, nu=nu))

  return optax.GradientTransformation(init, update)


def active_mask(params, order: Sequence[str]):
  """Params-shaped tree of Python bools: False for a modality-keyed bridge leaf whose modality
  is not in `order`. Everything else (shared Q-Former, other parameters) is active."""
  def active(path, _):
    group = leaf_group(path)
    return group == ALL_GROUP or group in order
  return jax.tree_util.tree_map_with_path(active, params)


def masked_update(tx: optax.GradientTransformation, grads, opt_state, params,
                  order: Sequence[str]) -> tuple[Any, Any]:
  """(new params, new optimizer state) of one step on a batch of the modalities `order`.

  The plain optax update, except that leaves of absent modalities keep their old value, in the
  parameters and in every params-shaped part of the optimizer state (Adam moments, gradient
  accumulators) and their Adam update counts; the schedule's counter stays global. `order` is
  static, so the choice is made at trace time: no arithmetic touches the kept leaves.
  """
  mask = active_mask(params, order)
  if all(jax.tree.leaves(mask)):
    updates, new_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state
  if isinstance(opt_state, optax.MultiStepsState):
    raise ConfigError(
        f"optim.grad_accum_steps > 1 with a batch of modalities {tuple(order)} that lacks "
        "other trained bridges: the accumulated gradients of the absent ones would go stale. "
        "Set optim.grad_accum_steps=1 and use train.microbatches to accumulate inside a step")
  updates, new_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  pick = lambda new, old, keep_new: new if keep_new else old
  params_def = jax.tree.structure(params)
  like_params = lambda x: jax.tree.structure(x) == params_def

  def select(new, old):
    return jax.tree.map(pick, new, old, mask) if like_params(new) else new

  new_state = jax.tree.map(select, new_state, opt_state, is_leaf=like_params)
  is_adam = lambda x: isinstance(x, ScaleByGroupedAdamState)

  def keep_counts(new, old):
    if not is_adam(new):
      return new
    count = {g: c if g == ALL_GROUP or g in order else old.count[g]
             for g, c in new.count.items()}
    return new._replace(count=count)

  new_state = jax.tree.map(keep_counts, new_state, opt_state, is_leaf=is_adam)
  return jax.tree.map(pick, new_params, params, mask), new_state
