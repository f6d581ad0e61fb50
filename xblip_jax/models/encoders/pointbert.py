"""ULIP-2 PointBERT, the frozen point-cloud tower of X-InstructBLIP (LAVIS `PointTransformer`).

Data flow (eval mode, xyz only):

  xyz (B, N, 3) -> FPS centres (G) + kNN neighbourhoods (M points, minus their centre)
  -> mini-PointNet per group: [1x1 conv 3->128, BatchNorm, ReLU, 1x1 conv 128->256],
     concat(global max over M, per point) -> [1x1 conv 512->512, BatchNorm, ReLU, 512->C],
     max over M
  -> reduce_dim (C -> D); tokens = [cls_token, groups]; pos = [cls_pos, MLP(centres)]
  -> for every block: x = block(x + pos)   (pos re-added before EVERY block)
  -> final LayerNorm -> cat(x[:, 0], max over group tokens) (2D) @ pc_projection -> (B, 1, E).

X-InstructBLIP hands the pc Q-Former ONE token per sample: `pc_ln(pooled)`, with `pc_ln` owned by
the bridge (trainable), not by this module. BatchNorm uses its running statistics, which are
`nnx.BatchStat` variables (loaded from the checkpoint, never trained).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from xblip_jax.models import layers
from xblip_jax.models.encoders.point_grouping import group_points
from xblip_jax.models.layers import Precision


@dataclasses.dataclass(frozen=True)
class PointBertConfig:
  """PointBERT (`PointTransformer_8192point.yaml`) plus the ULIP-2 projection.

  Attributes:
    trans_dim: transformer width D.
    depth: number of transformer blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width is ``int(trans_dim * mlp_ratio)``.
    qkv_bias: whether the fused qkv projection has a bias (False in PointBERT).
    group_size: points per neighbourhood M.
    num_group: number of FPS centres G (tokens besides cls).
    encoder_dims: width C of the mini-PointNet's group feature.
    npoints: points per cloud produced by the data pipeline (the model accepts any N >= G, M).
    pc_feat_dim: width of cat(cls, max-pooled groups) = 2 * trans_dim.
    embed_dim: ULIP embedding width E (`pc_projection` output; the pc Q-Former's encoder width).
    layer_norm_eps: eps of every LayerNorm (torch default).
    batchnorm_eps: eps of the PointNet BatchNorms (torch default).
    first_conv_dims: widths of the PointNet's first 1x1-conv stack (hard-coded in LAVIS).
    second_conv_hidden: hidden width of its second stack (hard-coded in LAVIS; input is
      2 * first_conv_dims[1]).
    pos_hidden: hidden width of the centre position MLP (hard-coded in LAVIS).
  """

  trans_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  group_size: int = 32
  num_group: int = 512
  encoder_dims: int = 256
  npoints: int = 8192
  pc_feat_dim: int = 768
  embed_dim: int = 512
  layer_norm_eps: float = 1e-5
  batchnorm_eps: float = 1e-5
  first_conv_dims: tuple[int, int] = (128, 256)
  second_conv_hidden: int = 512
  pos_hidden: int = 128

  def __post_init__(self):
    if self.pc_feat_dim != 2 * self.trans_dim:
      raise ValueError(f"pc_feat_dim {self.pc_feat_dim} must be 2 * trans_dim "
                       f"({2 * self.trans_dim}): set both when overriding trans_dim")
    if self.trans_dim % self.num_heads:
      raise ValueError(f"trans_dim {self.trans_dim} is not divisible by num_heads {self.num_heads}")
    if max(self.num_group, self.group_size) > self.npoints:
      raise ValueError(f"num_group {self.num_group} / group_size {self.group_size} exceed "
                       f"npoints {self.npoints}")

  @property
  def head_dim(self) -> int:
    return self.trans_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.trans_dim * self.mlp_ratio)

  @classmethod
  def ulip2_pointbert(cls) -> "PointBertConfig":
    """The released X-InstructBLIP 3D encoder: ULIP-2 PointBERT, 8192 points, 512 groups of 32."""
    return cls()

  @classmethod
  def tiny(cls, **overrides: Any) -> "PointBertConfig":
    """A test-sized model (the golden `pointbert_a` shapes); `pc_feat_dim` follows `trans_dim`."""
    kw: dict[str, Any] = dict(trans_dim=48, depth=2, num_heads=4, group_size=8, num_group=16,
                              encoder_dims=32, npoints=256, embed_dim=32)
    kw.update(overrides)
    kw.setdefault("pc_feat_dim", 2 * kw["trans_dim"])
    return cls(**kw)

  @classmethod
  def from_lavis(cls, config: Mapping[str, Any]) -> "PointBertConfig":
    """From a LAVIS/ULIP config dict (yaml keys, plus `pc_feat_dims` and `embed_dim`)."""
    kw: dict[str, Any] = {k: config[k] for k in (
        "trans_dim", "depth", "num_heads", "group_size", "num_group", "encoder_dims", "npoints",
        "embed_dim") if k in config}
    kw["pc_feat_dim"] = config.get("pc_feat_dims", 2 * kw.get("trans_dim", cls.trans_dim))
    return cls(**kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PointBertOutput:
  """PointBERT's output and the intermediates the golden exposes.

  Attributes:
    pooled: `pc_projection(cat(cls, max over groups))[:, None]`, the ONE token per sample that
      (after the bridge's `pc_ln`) the pc Q-Former cross-attends to. (B, 1, E).
    tokens: final-LayerNorm output, cls first. (B, 1+G, D).
    pooled_features: cat(tokens[:, 0], max over tokens[:, 1:]) before projection. (B, 2D).
    hidden_states: output of each block (before the next position add). depth x (B, 1+G, D).
    center_indices: FPS indices of the centres. (B, G) int32.
    knn_indices: neighbours of each centre, nearest first. (B, G, M) int32.
    centers: centre coordinates. (B, G, 3).
    neighborhood: neighbours minus their centre. (B, G, M, 3).
    group_tokens: mini-PointNet output per group. (B, G, C).
    group_embeds: `reduce_dim(group_tokens)`. (B, G, D).
    pos_embed: position MLP of the centres (cls_pos not included). (B, G, D).
  """

  pooled: Float[Array, "B 1 E"]
  tokens: Float[Array, "B T D"]
  pooled_features: Float[Array, "B F"]
  hidden_states: tuple[Float[Array, "B T D"], ...]
  center_indices: Int[Array, "B G"]
  knn_indices: Int[Array, "B G M"]
  centers: Float[Array, "B G 3"]
  neighborhood: Float[Array, "B G M 3"]
  group_tokens: Float[Array, "B G C"]
  group_embeds: Float[Array, "B G D"]
  pos_embed: Float[Array, "B G D"]


class FrozenBatchNorm(nnx.Module):
  """BatchNorm1d in inference mode: running statistics, computed in float32.

  `scale`/`bias` are `nnx.Param`s (torch `weight`/`bias`); `mean`/`var` are `nnx.BatchStat`s
  (torch `running_mean`/`running_var`), so an optimiser over `nnx.Param` never touches them.
  """

  def __init__(self, features: int, *, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=("norm",))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32), out_sharding=("norm",))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: Float[Array, "... C"]) -> Float[Array, "... C"]:
    inv = jax.lax.rsqrt(self.var[...].astype(jnp.float32) + self.eps)
    y = (x.astype(jnp.float32) - self.mean[...].astype(jnp.float32)) * inv
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class PointNetGroupEncoder(nnx.Module):
  """LAVIS `dvae.Encoder`: a mini-PointNet mapping each (M, 3) neighbourhood to one C-vector.

  The 1x1 Conv1d layers are dense layers over the last axis.
  """

  def __init__(self, cfg: PointBertConfig, *, precision: Precision, rngs: nnx.Rngs):
    h1, h2 = cfg.first_conv_dims
    h3 = cfg.second_conv_hidden
    dense = lambda i, o: layers.dense(i, o, ("conv_in", "conv_out"), precision=precision,
                                      rngs=rngs)
    bn = lambda f: FrozenBatchNorm(f, eps=cfg.batchnorm_eps, param_dtype=precision.jnp_param_dtype)
    self.conv1, self.bn1, self.conv2 = dense(3, h1), bn(h1), dense(h1, h2)
    self.conv3, self.bn2, self.conv4 = dense(2 * h2, h3), bn(h3), dense(h3, cfg.encoder_dims)

  def __call__(self, groups: Float[Array, "B G M 3"]) -> Float[Array, "B G C"]:
    f = self.conv2(jax.nn.relu(self.bn1(self.conv1(groups))))  # (B, G, M, h2)
    g = jnp.broadcast_to(jnp.max(f, axis=2, keepdims=True), f.shape)
    f = jnp.concatenate([g, f], axis=-1)  # global feature first, as LAVIS
    f = self.conv4(jax.nn.relu(self.bn2(self.conv3(f))))
    return jnp.max(f, axis=2)


class Block(nnx.Module):
  """Pre-LN ViT block (timm style): qkv without bias, exact GELU MLP."""

  def __init__(self, cfg: PointBertConfig, *, precision: Precision, rngs: nnx.Rngs):
    d, pd = cfg.trans_dim, precision.jnp_param_dtype
    self.num_heads = cfg.num_heads
    self.scale = cfg.head_dim ** -0.5
    self.dtype = precision.jnp_dtype
    self.lax_precision = precision.lax_precision
    self.norm1 = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd)
    self.qkv = layers.dense(d, 3 * d, ("embed", "heads"), precision=precision, rngs=rngs,
                            use_bias=cfg.qkv_bias)
    self.proj = layers.dense(d, d, ("heads", "embed"), precision=precision, rngs=rngs)
    self.norm2 = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd)
    self.fc1 = layers.dense(d, cfg.mlp_dim, ("embed", "mlp"), precision=precision, rngs=rngs)
    self.fc2 = layers.dense(cfg.mlp_dim, d, ("mlp", "embed"), precision=precision, rngs=rngs)

  def attention(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.lax_precision) * self.scale
    probs = layers.softmax_f32(scores, self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.lax_precision)
    return self.proj(out.reshape(b, t, d))

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    x = x + self.attention(self.norm1(x))
    return x + self.fc2(layers.gelu_exact(self.fc1(self.norm2(x))))


class PointBert(nnx.Module):
  """ULIP-2 PointBERT with the ULIP `pc_projection`, as X-InstructBLIP's frozen 3D encoder."""

  def __init__(self, cfg: PointBertConfig, *, precision: Precision, rngs: nnx.Rngs):
    d, pd = cfg.trans_dim, precision.jnp_param_dtype
    self.cfg = cfg
    self.dtype = precision.jnp_dtype
    self.lax_precision = precision.lax_precision
    self.encoder = PointNetGroupEncoder(cfg, precision=precision, rngs=rngs)
    self.reduce_dim = layers.dense(cfg.encoder_dims, d, ("conv_out", "embed"),
                                   precision=precision, rngs=rngs)
    token_init = lambda: nnx.initializers.normal(0.02)(rngs.params(), (1, 1, d), pd)
    self.cls_token = nnx.Param(token_init(), out_sharding=(None, None, "embed"))
    self.cls_pos = nnx.Param(token_init(), out_sharding=(None, None, "embed"))
    self.pos_embed_in = layers.dense(3, cfg.pos_hidden, ("conv_in", "mlp"), precision=precision,
                                     rngs=rngs)
    self.pos_embed_out = layers.dense(cfg.pos_hidden, d, ("mlp", "embed"), precision=precision,
                                      rngs=rngs)
    self.blocks = nnx.List([Block(cfg, precision=precision, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd)
    proj = nnx.initializers.normal(cfg.embed_dim ** -0.5)(rngs.params(),
                                                          (cfg.pc_feat_dim, cfg.embed_dim), pd)
    # Stored (in, out) and used as `feat @ pc_projection`, exactly as ULIP's raw parameter.
    self.pc_projection = nnx.Param(proj, out_sharding=("embed", "enc_embed"))

  def __call__(self, xyz: Float[Array, "B N 3"]) -> PointBertOutput:
    """Encodes point clouds (xyz only, e.g. `pc_norm`-ed; grouping runs in float32)."""
    cfg = self.cfg
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
      raise ValueError(f"PointBERT takes xyz point clouds (B, N, 3), got shape {xyz.shape}; "
                       "colour or normal channels must be dropped by the data pipeline")
    center_idx, knn_idx, centers, neighborhood = group_points(xyz, cfg.num_group, cfg.group_size)
    group_tokens = self.encoder(neighborhood.astype(self.dtype))
    group_embeds = self.reduce_dim(group_tokens)
    pos_embed = self.pos_embed_out(layers.gelu_exact(self.pos_embed_in(centers.astype(self.dtype))))
    b = xyz.shape[0]
    expand = lambda p: jnp.broadcast_to(p[...].astype(self.dtype), (b, 1, cfg.trans_dim))
    x = jnp.concatenate([expand(self.cls_token), group_embeds], axis=1)
    pos = jnp.concatenate([expand(self.cls_pos), pos_embed], axis=1)
    hidden = []
    for block in self.blocks:
      x = block(x + pos)
      hidden.append(x)
    tokens = self.norm(x)
    pooled_features = jnp.concatenate([tokens[:, 0], jnp.max(tokens[:, 1:], axis=1)], axis=-1)
    pc_embed = jnp.matmul(pooled_features, self.pc_projection[...].astype(self.dtype),
                          precision=self.lax_precision)
    return PointBertOutput(
        pooled=pc_embed[:, None, :], tokens=tokens, pooled_features=pooled_features,
        hidden_states=tuple(hidden), center_indices=center_idx, knn_indices=knn_idx,
        centers=centers, neighborhood=neighborhood, group_tokens=group_tokens,
        group_embeds=group_embeds, pos_embed=pos_embed)


def validate_points(xyz, sample_ids: Sequence[Any] | Any | None = None) -> None:
  """Rejects point clouds PointBERT cannot encode, naming the offending sample.

  Args:
    xyz: one cloud (N, 3) or a batch (B, N, 3) (numpy or anything `np.asarray` accepts).
    sample_ids: the sample id of the cloud, or one id per batch row; indices are used if None.

  Raises:
    ValueError: wrong shape (not xyz-only), or NaN/inf coordinates (the message names the sample
      and how many values are bad, since one NaN point poisons FPS, kNN and max-pooling).
  """
  arr = np.asarray(xyz)
  single = arr.ndim == 2
  batch = arr[None] if single else arr
  if single and sample_ids is not None:
    sample_ids = [sample_ids]
  if batch.ndim != 3 or batch.shape[-1] != 3:
    who = f" (sample {sample_ids[0]!r})" if single and sample_ids is not None else ""
    raise ValueError(f"point cloud{who} must have shape (N, 3) or (B, N, 3) with xyz only, "
                     f"got {arr.shape}")
  if sample_ids is None:
    sample_ids = list(range(batch.shape[0]))
  elif len(sample_ids) != batch.shape[0]:
    raise ValueError(f"{len(sample_ids)} sample ids for {batch.shape[0]} point clouds")
  if not np.issubdtype(batch.dtype, np.number):
    raise ValueError(f"point clouds must be numeric, got dtype {batch.dtype}")
  bad = ~np.isfinite(batch)
  for i in np.flatnonzero(bad.any(axis=(1, 2))):
    n_nan = int(np.isnan(batch[i]).sum())
    n_inf = int(bad[i].sum()) - n_nan
    first = int(np.flatnonzero(bad[i].any(-1))[0])
    raise ValueError(f"point cloud of sample {sample_ids[i]!r} has non-finite coordinates "
                     f"({n_nan} NaN, {n_inf} inf; first bad point index {first})")
