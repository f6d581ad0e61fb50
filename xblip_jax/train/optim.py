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
arises (docs/quirks.md Q37). `optim.grad_accum_steps > 1` (optax `MultiSteps`) cannot be masked
this way (its accumulator would mix modalities across steps), so such a batch is a config
error; `train.microbatches` accumulates inside one step and is fine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

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
  parts.append(optax.adamw(lavis_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
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


def active_mask(params, order: Sequence[str]):
  """Params-shaped tree of Python bools: False for a modality-keyed bridge leaf whose modality
  is not in `order`. Everything else (shared Q-Former, other parameters) is active."""
  def active(path, _):
    keys = [_key(k) for k in path]
    return not (len(keys) > 1 and keys[0] in MODALITY_KEYED
                and keys[1] != SHARED_KEY and keys[1] not in order)
  return jax.tree_util.tree_map_with_path(active, params)


def masked_update(tx: optax.GradientTransformation, grads, opt_state, params,
                  order: Sequence[str]) -> tuple[Any, Any]:
  """(new params, new optimizer state) of one step on a batch of the modalities `order`.

  The plain optax update, except that leaves of absent modalities keep their old value, in the
  parameters and in every params-shaped part of the optimizer state (Adam moments, gradient
  accumulators). Step counters (schedule, bias correction) stay global. `order` is static, so
  the choice is made at trace time: no arithmetic touches the kept leaves.
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
  return jax.tree.map(pick, new_params, params, mask), new_state
