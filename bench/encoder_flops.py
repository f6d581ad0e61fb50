"""FLOPs per sample of the frozen encoders: analytic (from the config) and traced (from a jaxpr).

Conventions:
  * a matmul of (m, k) by (k, n) is `2*m*n*k` FLOPs; a convolution is `2 * (out channels) *
    (in channels / groups) * (valid kernel taps summed over output positions)`, padding taps
    excluded (what XLA's cost analysis counts);
  * "matmul" components are dense layers, convolutions and the two attention products (scores
    `q k^T` and `probs v`); "other" components are the named elementwise work the brief asks for:
    BEATs' gated relative bias (gate product and add, `2*H*N^2`) and PointBERT's grouping
    (FPS: 8 FLOPs per squared distance + 1 for the running minimum, per centre per point; kNN: 8
    per centre-point distance). LayerNorm, softmax, GELU, residual adds and biases are not counted
    (XLA's `cost_analysis` does count them, hence its slightly larger totals);
  * the count is of what the implementation runs: BEATs' even-kernel position conv computes N+1
    steps (SamePad drops one afterwards); PointBERT's mini-PointNet runs on every point of every
    group.

`traced_matmul_flops` walks the jaxpr of the real forward and sums `dot_general` and
`conv_general_dilated` FLOPs (scan bodies times their length): an independent check of the
analytic "matmul" part.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from xblip_jax.models.encoders.beats import BeatsConfig
from xblip_jax.models.encoders.eva_vit import EvaViTConfig
from xblip_jax.models.encoders.pointbert import PointBertConfig

# Components counted as "other" (not matmul); everything else is matmul work.
OTHER = frozenset({"rel_bias_gate", "fps", "knn"})


def _valid_taps(length: int, kernel: int, pad_lo: int, pad_hi: int, stride: int = 1) -> int:
  """Sum over output positions of the kernel taps that land inside the (unpadded) input."""
  out = (length + pad_lo + pad_hi - kernel) // stride + 1
  start = np.arange(out) * stride - pad_lo  # input index of tap 0
  lo = np.maximum(start, 0)
  hi = np.minimum(start + kernel, length)
  return int(np.maximum(hi - lo, 0).sum())


def _transformer_layer(n: int, d: int, mlp: int) -> dict[str, int]:
  """One self-attention block on n tokens of width d (fused or separate q/k/v: same FLOPs)."""
  return {
      "qkv": 2 * n * d * 3 * d,
      "attn_out_proj": 2 * n * d * d,
      "attn_scores": 2 * n * n * d,  # all heads: H * (2 * n * n * head_dim)
      "attn_values": 2 * n * n * d,
      "mlp": 2 * 2 * n * d * mlp,
  }


def _times(parts: dict[str, int], k: int) -> dict[str, int]:
  return {name: k * v for name, v in parts.items()}


def vit_flops(cfg: EvaViTConfig, img_size: int | None = None) -> dict[str, int]:
  """EVA ViT FLOPs per image, by component (summed over all blocks)."""
  grid = (img_size or cfg.img_size) // cfg.patch_size
  patches = grid * grid
  out = {"patch_embed": 2 * patches * cfg.patch_size**2 * cfg.in_chans * cfg.width}
  out.update(_times(_transformer_layer(patches + 1, cfg.width, cfg.mlp_dim), cfg.depth))
  return out


def beats_flops(cfg: BeatsConfig, num_frames: int) -> dict[str, int]:
  """BEATs FLOPs per clip of `num_frames` fbank frames, by component."""
  p, e, d, h = cfg.input_patch_size, cfg.embed_dim, cfg.encoder_embed_dim, cfg.encoder_attention_heads
  n = cfg.num_tokens(num_frames)
  out = {"patch_embed": 2 * n * p * p * 1 * e}
  if e != d:
    out["post_extract_proj"] = 2 * n * e * d
  pad = cfg.conv_pos // 2
  taps = _valid_taps(n, cfg.conv_pos, pad, pad)
  out["pos_conv"] = 2 * d * (d // cfg.conv_pos_groups) * taps
  layer = _transformer_layer(n, d, cfg.encoder_ffn_embed_dim)
  if cfg.relative_position_embedding:
    if cfg.gru_rel_pos:
      layer["rel_bias_grep_linear"] = 2 * n * h * cfg.head_dim * 8
      layer["rel_bias_gate"] = 2 * h * n * n  # gate * bias, then + scores
    else:
      layer["rel_bias_gate"] = h * n * n  # + scores
  out.update(_times(layer, cfg.encoder_layers))
  return out


def pointbert_flops(cfg: PointBertConfig, num_points: int | None = None) -> dict[str, int]:
  """PointBERT (+ ULIP projection) FLOPs per cloud of `num_points` points, by component."""
  n = num_points or cfg.npoints
  g, m, d = cfg.num_group, cfg.group_size, cfg.trans_dim
  h1, h2 = cfg.first_conv_dims
  h3, c = cfg.second_conv_hidden, cfg.encoder_dims
  out = {
      "fps": 9 * g * n,
      "knn": 8 * g * n,
      "pointnet": 2 * g * m * (3 * h1 + h1 * h2 + 2 * h2 * h3 + h3 * c),
      "reduce_dim": 2 * g * c * d,
      "pos_mlp": 2 * g * (3 * cfg.pos_hidden + cfg.pos_hidden * d),
  }
  out.update(_times(_transformer_layer(g + 1, d, cfg.mlp_dim), cfg.depth))
  out["pc_projection"] = 2 * cfg.pc_feat_dim * cfg.embed_dim
  return out


def totals(parts: dict[str, int]) -> dict[str, int]:
  """{"matmul": ..., "other": ..., "total": ...} of a component breakdown."""
  mm = sum(v for k, v in parts.items() if k not in OTHER)
  other = sum(v for k, v in parts.items() if k in OTHER)
  return {"matmul": mm, "other": other, "total": mm + other}


# ----------------------------------------------------------------------------------------------
# Counting the matmul FLOPs of a traced function.


def _dot_flops(eqn) -> int:
  """2 * (output elements, batch dims included) * (contracted size)."""
  (contracting, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in contracting]))


def _conv_flops(eqn) -> int:
  """2 * batch * out channels * in channels per group * valid taps (padding excluded)."""
  lhs = eqn.invars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  out = eqn.outvars[0].aval.shape
  if any(d != 1 for d in eqn.params["lhs_dilation"]) or any(
      d != 1 for d in eqn.params["rhs_dilation"]):
    raise NotImplementedError("dilated convolutions are not counted")
  taps = 1
  for i, (lo, hi) in enumerate(eqn.params["padding"]):
    taps *= _valid_taps(lhs[lhs_spec[2 + i]], rhs[rhs_spec[2 + i]], lo, hi,
                        eqn.params["window_strides"][i])
  if eqn.params["batch_group_count"] != 1:
    raise NotImplementedError("batch-grouped convolutions are not counted")
  batch = out[out_spec[0]]
  out_ch, in_ch_per_group = rhs[rhs_spec[0]], rhs[rhs_spec[1]]
  return 2 * batch * out_ch * in_ch_per_group * taps


def _sub_jaxprs(params: dict[str, Any]):
  for v in params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def jaxpr_matmul_flops(jaxpr) -> tuple[int, int]:
  """(FLOPs, number of while loops whose body was counted once) of a jaxpr, recursively."""
  total, loops = 0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    else:
      mult = eqn.params["length"] if name == "scan" else 1
      loops += name == "while"
      for sub in _sub_jaxprs(eqn.params):
        f, w = jaxpr_matmul_flops(sub)
        total, loops = total + mult * f, loops + w
  return total, loops


def traced_matmul_flops(fn: Callable, *args) -> tuple[int, int]:
  """Matmul FLOPs of `fn(*args)` (args may be `jax.ShapeDtypeStruct`s) and while-loop count."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
