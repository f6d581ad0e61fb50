"""Golden check of the EVA ViT (+ `ln_vision`) against LAVIS `VisionTransformer` outputs."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xblip_jax.convert import mapping
from xblip_jax.convert.eva_vit_keys import lavis_rules
from xblip_jax.golden.case import Case, Comparison, compare
from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig
from xblip_jax.models.layers import LayerNorm, Precision


class _VitWithLn(nnx.Module):
  """The ViT and the bridge LayerNorm side by side, so one strict load covers every key."""

  def __init__(self, cfg: EvaViTConfig, ln_eps: float):
    self.vit = EvaViT(cfg, precision=Precision.float32(), rngs=nnx.Rngs(0))
    self.ln = LayerNorm(cfg.width, eps=ln_eps)


def config_from_meta(meta: dict) -> tuple[EvaViTConfig, float]:
  """The ViT config and the `ln_vision` eps of a case's json sidecar."""
  c = meta["config"]
  cfg = EvaViTConfig(
      img_size=int(c["img_size"]), patch_size=int(c["patch_size"]), width=int(c["embed_dim"]),
      depth=int(c["depth"]), num_heads=int(c["num_heads"]), mlp_ratio=float(c["mlp_ratio"]),
      layer_norm_eps=float(c.get("norm_layer_eps", 1e-6)), in_chans=int(c.get("in_chans", 3)))
  if "mlp_hidden_dim" in c and int(c["mlp_hidden_dim"]) != cfg.mlp_dim:
    raise ValueError(f"mlp hidden {cfg.mlp_dim} != case's {c['mlp_hidden_dim']}")
  return cfg, float(c.get("ln_vision_eps", 1e-5))


def build(case: Case) -> _VitWithLn:
  """The model filled from the case's parameters (built abstractly: a strict load sets all)."""
  cfg, ln_eps = config_from_meta(case.meta)
  model = nnx.eval_shape(lambda: _VitWithLn(cfg, ln_eps))
  rules = lavis_rules(cfg, ours_prefix="vit.") + mapping.layer_norm("ln", "ln_vision")
  mapping.load_state_dict(model, rules, case.params)
  return model


def check(case: Case) -> list[Comparison]:
  model = build(case)
  pixels = jnp.asarray(np.transpose(case.inputs["image"], (0, 2, 3, 1)))  # NCHW -> NHWC
  patches, blocks, features_ln = _forward(model, pixels)
  got = {
      "patch_embed_out": patches.reshape(pixels.shape[0], -1, patches.shape[-1]),
      "features": blocks[-1],
      "features_ln": features_ln,
  }
  got.update({f"block_{i}_out": b for i, b in enumerate(blocks)})
  out = []
  for name in sorted(case.outputs, key=_natural):
    if name in got:
      out.append(compare(name, got[name], case.outputs[name]))
  missing = {"features", "features_ln"} - set(case.outputs)
  if missing:
    raise KeyError(f"case lacks outputs {sorted(missing)}")
  return out


@nnx.jit
def _forward(model: _VitWithLn, pixels):
  blocks = model.vit.hidden_states(pixels)
  return model.vit.patch_embed(pixels), blocks, model.ln(blocks[-1])


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
