"""Key-mapping tables for the EVA ViT: LAVIS / `eva_vit_g.pth` keys and `Blip2VisionModel` keys.

Our paths (see `xblip_jax/models/encoders/eva_vit.py`): `patch_embed.{kernel,bias}`,
`cls_token (D,)`, `pos_embed (N, D)`, `blocks.{i}.{norm1,norm2}.{scale,bias}`,
`blocks.{i}.attn.qkv.kernel (D, 3D)`, `blocks.{i}.attn.{q_bias,v_bias}`,
`blocks.{i}.attn.proj.*`, `blocks.{i}.mlp.{fc1,fc2}.*`.

A checkpoint position embedding laid out for another image size is resampled bicubically on load
(LAVIS `interpolate_pos_embed`); export writes our own grid.

In the full X-InstructBLIP state dict the LAVIS keys sit under `image_encoder.` / `video_encoder.`
(BLIP-2: `visual_encoder.`); pass that as `load_state_dict(prefix=...)`. `eva_vit_g.pth` has a 40th
block that the 39-block model ignores: pass `ignore=eva_vit_ignore(cfg)`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xblip_jax.convert.mapping import Rule, conv, layer_norm, linear, rule
from xblip_jax.models.encoders.eva_vit import EvaViTConfig, interpolate_pos_embed


def _cls_rule(theirs: str, width: int) -> Rule:
  return rule("cls_token", theirs,
              lambda x: (x.reshape(-1),),  # a wrong width is reported as mis-shaped
              lambda x: (x.reshape(1, 1, width),))


def _pos_rule(theirs: str, cfg: EvaViTConfig) -> Rule:

  def to_ours(x: np.ndarray):
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == cfg.num_tokens:
      return (x,)
    try:  # another image size: resample the patch rows in float32 (as LAVIS), keep the CLS row
      return (interpolate_pos_embed(x.astype(np.float32), cfg.grid),)
    except ValueError:  # not a square grid: let the loader report the shape
      return (x,)

  return rule("pos_embed", theirs, to_ours, lambda x: (x[None],))


def _block_common(i: int, theirs: str, names: dict[str, str]) -> list[Rule]:
  ours = f"blocks.{i}"
  return [
      *layer_norm(f"{ours}.norm1", f"{theirs}.{names['norm1']}"),
      *linear(f"{ours}.attn.qkv", f"{theirs}.{names['qkv']}", bias=False),
      *linear(f"{ours}.attn.proj", f"{theirs}.{names['proj']}"),
      *layer_norm(f"{ours}.norm2", f"{theirs}.{names['norm2']}"),
      *linear(f"{ours}.mlp.fc1", f"{theirs}.mlp.fc1"),
      *linear(f"{ours}.mlp.fc2", f"{theirs}.mlp.fc2"),
  ]


def _with_prefix(rules: list[Rule], ours_prefix: str) -> list[Rule]:
  if not ours_prefix:
    return rules
  return [dataclasses.replace(r, ours=tuple(ours_prefix + o for o in r.ours)) for r in rules]


def lavis_rules(cfg: EvaViTConfig, *, ours_prefix: str = "") -> list[Rule]:
  """LAVIS `VisionTransformer` / `eva_vit_g.pth` keys.

  Args:
    cfg: the model's config (depth and position grid).
    ours_prefix: prepended to our paths when the ViT is a submodule (e.g. ``"image_encoder."``).
  """
  names = dict(norm1="norm1", norm2="norm2", qkv="attn.qkv", proj="attn.proj")
  rules = [
      *conv("patch_embed", "patch_embed.proj"),
      _cls_rule("cls_token", cfg.width),
      _pos_rule("pos_embed", cfg),
  ]
  for i in range(cfg.depth):
    rules += _block_common(i, f"blocks.{i}", names)
    rules.append(rule(f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.q_bias"))
    rules.append(rule(f"blocks.{i}.attn.v_bias", f"blocks.{i}.attn.v_bias"))
  return _with_prefix(rules, ours_prefix)


def eva_vit_ignore(cfg: EvaViTConfig) -> list[str]:
  """Regexes for LAVIS keys of blocks beyond `cfg.depth` (`eva_vit_g.pth` has 40 blocks)."""
  return [rf"blocks\.(?!({'|'.join(str(i) for i in range(cfg.depth))})\.)\d+\..*"]


def _split_qkv_bias(width: int):

  def to_ours(bias: np.ndarray):
    # The key third is dropped: a key bias adds q.b_k to every score of a query row, which the
    # softmax cancels, so LAVIS (and this model) have none.
    return bias[:width], bias[2 * width:]

  def to_theirs(q_bias: np.ndarray, v_bias: np.ndarray):
    return (np.concatenate([q_bias, np.zeros_like(q_bias), v_bias]),)

  return to_ours, to_theirs


def hf_rules(cfg: EvaViTConfig, *, ours_prefix: str = "") -> list[Rule]:
  """`transformers.Blip2VisionModel` / `InstructBlipVisionModel` keys (without `vision_model.`).

  `post_layernorm` is not part of this module: it corresponds to the bridge's `image_ln`
  (LAVIS `ln_vision`, eps 1e-5).
  """
  names = dict(norm1="layer_norm1", norm2="layer_norm2", qkv="self_attn.qkv",
               proj="self_attn.projection")
  to_ours, to_theirs = _split_qkv_bias(cfg.width)
  rules = [
      *conv("patch_embed", "embeddings.patch_embedding"),
      _cls_rule("embeddings.class_embedding", cfg.width),
      _pos_rule("embeddings.position_embedding", cfg),
  ]
  for i in range(cfg.depth):
    theirs = f"encoder.layers.{i}"
    rules += _block_common(i, theirs, names)
    rules.append(rule((f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias"),
                      f"{theirs}.self_attn.qkv.bias", to_ours, to_theirs))
  return _with_prefix(rules, ours_prefix)
