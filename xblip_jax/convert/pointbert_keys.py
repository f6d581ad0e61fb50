"""Key mapping: ULIP-2 PointBERT (`point_encoder.*`, `pc_projection`) <-> `PointBert`.

Source keys are `ULIP_WITH_IMAGE` state-dict keys (the ULIP checkpoint with `module.` stripped);
inside a full X-InstructBLIP state dict they sit under `PREFIX` (``pc_encoder.``). `pc_ln.*` is
the bridge's LayerNorm, not part of this tower. BatchNorm `running_mean`/`running_var` map to our
`nnx.BatchStat`s `mean`/`var`; `num_batches_tracked` is unused in eval mode (see `IGNORE`).
"""

from __future__ import annotations

import numpy as np

from xblip_jax.convert.mapping import Rule, copy, layer_norm, linear, rule
from xblip_jax.models.encoders.pointbert import PointBertConfig

# Prefix of these keys in Blip2VicunaXInstruct's state dict.
PREFIX = "pc_encoder."
# Source keys that are expected and deliberately unused (regexes for `load_state_dict(ignore=)`).
IGNORE = (r"point_encoder\.encoder\.(first|second)_conv\.1\.num_batches_tracked",)


def _conv1x1(ours: str, theirs: str) -> list[Rule]:
  """torch Conv1d(k=1) `weight (out, in, 1)` <-> dense `kernel (in, out)`; bias copied."""

  def to_ours(w: np.ndarray):
    if w.ndim != 3 or w.shape[-1] != 1:
      raise ValueError(f"{theirs}.weight: expected a kernel-size-1 Conv1d weight, got {w.shape}")
    return (np.ascontiguousarray(w[:, :, 0].T),)

  def to_theirs(k: np.ndarray):
    return (np.ascontiguousarray(k.T[:, :, None]),)

  return [rule(f"{ours}.kernel", f"{theirs}.weight", to_ours, to_theirs),
          copy(f"{ours}.bias", f"{theirs}.bias")]


def _batch_norm(ours: str, theirs: str) -> list[Rule]:
  return [copy(f"{ours}.scale", f"{theirs}.weight"), copy(f"{ours}.bias", f"{theirs}.bias"),
          copy(f"{ours}.mean", f"{theirs}.running_mean"),
          copy(f"{ours}.var", f"{theirs}.running_var")]


def rules(cfg: PointBertConfig) -> list[Rule]:
  """The mapping table for `PointBert(cfg)`: every parameter and BatchNorm statistic."""
  src = "point_encoder"
  out: list[Rule] = []
  for ours, theirs in (("conv1", "first_conv.0"), ("conv2", "first_conv.3"),
                       ("conv3", "second_conv.0"), ("conv4", "second_conv.3")):
    out += _conv1x1(f"encoder.{ours}", f"{src}.encoder.{theirs}")
  out += _batch_norm("encoder.bn1", f"{src}.encoder.first_conv.1")
  out += _batch_norm("encoder.bn2", f"{src}.encoder.second_conv.1")
  out += linear("reduce_dim", f"{src}.reduce_dim")
  out += [copy("cls_token", f"{src}.cls_token"), copy("cls_pos", f"{src}.cls_pos")]
  out += linear("pos_embed_in", f"{src}.pos_embed.0")
  out += linear("pos_embed_out", f"{src}.pos_embed.2")
  for i in range(cfg.depth):
    ours, theirs = f"blocks.{i}", f"{src}.blocks.blocks.{i}"
    out += layer_norm(f"{ours}.norm1", f"{theirs}.norm1")
    out += linear(f"{ours}.qkv", f"{theirs}.attn.qkv", bias=cfg.qkv_bias)
    out += linear(f"{ours}.proj", f"{theirs}.attn.proj")
    out += layer_norm(f"{ours}.norm2", f"{theirs}.norm2")
    out += linear(f"{ours}.fc1", f"{theirs}.mlp.fc1")
    out += linear(f"{ours}.fc2", f"{theirs}.mlp.fc2")
  out += layer_norm("norm", f"{src}.norm")
  out.append(copy("pc_projection", "pc_projection"))  # already (in, out): used as x @ P
  return out
