"""Which frozen encoder serves which modality, and its features as `(B, C, N, E)`.

C is the number of frames (video) or clips (audio) per sample and 1 for image and 3D. Each
encoder module is imported only when its modality is configured, so one modality's
dependencies never block another.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import jax
from flax import nnx
from jaxtyping import Array, Float

from xblip_jax import config_utils
from xblip_jax.models.layers import Precision

# modality -> (module, config class, model class)
ENCODERS: dict[str, tuple[str, str, str]] = {
    "image": ("xblip_jax.models.encoders.eva_vit", "EvaViTConfig", "EvaViT"),
    "video": ("xblip_jax.models.encoders.eva_vit", "EvaViTConfig", "EvaViT"),
    "audio": ("xblip_jax.models.encoders.beats", "BeatsConfig", "Beats"),
    "pc": ("xblip_jax.models.encoders.pointbert", "PointBertConfig", "PointBert"),
}


def encoder_config(modality: str, section: Mapping[str, Any], where: str):
  module, cfg_cls, _ = ENCODERS[modality]
  return config_utils.build(getattr(importlib.import_module(module), cfg_cls), section, where)


def build_encoder(modality: str, cfg, *, precision: Precision, rngs: nnx.Rngs) -> nnx.Module:
  if modality not in ENCODERS:
    raise ValueError(f"unknown modality {modality!r}; known: {sorted(ENCODERS)}")
  module, _, model_cls = ENCODERS[modality]
  return getattr(importlib.import_module(module), model_cls)(cfg, precision=precision, rngs=rngs)


def feature_width(modality: str, cfg) -> int:
  """Width of the features the Q-Former cross-attends to."""
  if modality in ("image", "video"):
    return cfg.width
  if modality == "audio":
    return cfg.encoder_embed_dim
  return cfg.embed_dim  # pc: the ULIP projection width


def encode(modality: str, encoder: nnx.Module, media: Array) -> Float[Array, "B C N E"]:
  """Frozen features of a batch of media (gradients stopped)."""
  if modality == "image":
    feats = encoder(media)[:, None]
  elif modality == "video":
    feats = encoder.encode_video(media)
  elif modality == "audio":
    feats = encoder.encode_clips(media)
  elif modality == "pc":
    feats = encoder(media).pooled[:, None]
  else:
    raise ValueError(f"unknown modality {modality!r}")
  return jax.lax.stop_gradient(feats)
