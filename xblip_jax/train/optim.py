"""Optimizer and learning-rate schedule of the reference, in optax.

LAVIS `linear_warmup_cosine_lr` (iteration runner): during inner epoch 0 the rate rises linearly
from `warmup_lr` to `init_lr` over `warmup_steps` iterations and then stays at `init_lr`; from
inner epoch e >= 1 on it is constant within the epoch at
`min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * e / num_epochs))`.
AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 on every parameter with ndim >= 2 (query tokens
included; biases and norms excluded), no gradient clipping unless configured.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


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
