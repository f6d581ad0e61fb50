"""BEATs audio encoder (iter3 / iter3+ checkpoints), as LAVIS' `BEATs.extract_features` runs it.

The fbank "image" (B, T, 128) is cut into 16x16 patches, flattened time-major
(token = t_patch * 8 + f_patch), layer-normed, projected 512 -> 768, given a convolutional
position embedding and passed through a 12-layer post-LN transformer with deep-norm residuals and
a gated, bucketed relative position bias. Details that are easy to get wrong (all reproduced):

* `layer_norm` acts on the patch features before `post_extract_proj`.
* `pos_conv` is a weight-normalised grouped Conv1d, weight = g * v / ||v|| with the norm taken
  per kernel tap over (out, in/groups); with an even kernel the last output step is dropped
  (SamePad); then exact GELU.
* Residuals are scaled by the deep-norm alpha (2 * layers) ** 0.25 before each post-LN.
* Attention scores are computed as (q * d^-1/2 / 32) k^T, then (scores - rowmax) * 32.
* One relative position bias (heads, N, N) comes from layer 0's bucket table; every layer gates
  it with its own GRU-style gate a * (b * grep_a - 1) + 2, computed from the unscaled query.
* The frame padding mask is reduced to tokens by reshaping (B, T) to (B, N, T/N) and taking
  `all`, which ignores the time-major token layout (what the reference does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Bool, Float

from xblip_jax.models import layers
from xblip_jax.models.layers import Precision

_ATTN_ALPHA = 32.0  # the reference's fixed score rescaling factor




# LAVIS `BEATsConfig.__init__` defaults of the fields used here (before cfg.update).
_LAVIS_DEFAULTS: dict[str, Any] = dict(
    input_patch_size=-1, embed_dim=512, conv_bias=False, encoder_layers=12,
    encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    layer_norm_first=False, deep_norm=False, conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=False, num_buckets=320, max_distance=1280, gru_rel_pos=False)


@dataclasses.dataclass(frozen=True)
class BeatsConfig:
  """BEATs hyper-parameters; field names follow LAVIS' `BEATsConfig` (and checkpoint['cfg'])."""

  input_patch_size: int = 16
  embed_dim: int = 512
  encoder_embed_dim: int = 768
  encoder_layers: int = 12
  encoder_attention_heads: int = 12
  encoder_ffn_embed_dim: int = 3072
  conv_pos: int = 128
  conv_pos_groups: int = 16
  num_buckets: int = 320
  max_distance: int = 800
  deep_norm: bool = True
  layer_norm_first: bool = False
  relative_position_embedding: bool = True
  gru_rel_pos: bool = True
  conv_bias: bool = False
  layer_norm_eps: float = 1e-5
  num_mel_bins: int = 128

  @classmethod
  def beats_iter3(cls) -> "BeatsConfig":
    """`BEATs_iter3_plus_AS2M.pt` as X-InstructBLIP loads it (no predictor head)."""
    return cls()

  @classmethod
  def tiny(cls, **overrides: Any) -> "BeatsConfig":
    """A ~60k-parameter model with the iter3 booleans (the golden `beats_a` sizes), for tests."""
    base = dict(embed_dim=32, encoder_embed_dim=48, encoder_layers=2, encoder_attention_heads=4,
                encoder_ffn_embed_dim=96, conv_pos=16, conv_pos_groups=4, num_buckets=32,
                max_distance=128)
    return cls(**{**base, **overrides})

  @classmethod
  def from_lavis(cls, cfg: Mapping[str, Any], num_mel_bins: int = 128) -> "BeatsConfig":
    """From a LAVIS/BEATs cfg dict (`checkpoint['cfg']`, a golden's `config`).

    Keys the dict lacks take LAVIS' `BEATsConfig` defaults (not this class's iter3 ones), as
    `BEATsConfig(cfg)` would; dropout, layerdrop and gradient-decay entries are ignored.
    """
    if cfg.get("activation_fn", "gelu") != "gelu":
      raise ValueError(f"only activation_fn='gelu' is supported, got {cfg['activation_fn']!r}")
    if cfg.get("finetuned_model", False):
      raise ValueError("fine-tuned BEATs (with a predictor head) is not supported")
    names = {f.name for f in dataclasses.fields(cls)} - {"num_mel_bins"}
    merged = {**_LAVIS_DEFAULTS, **{k: v for k, v in cfg.items() if k in names}}
    if merged["input_patch_size"] <= 0:
      raise ValueError("cfg has no input_patch_size")
    return cls(num_mel_bins=num_mel_bins, **merged)

  @property
  def head_dim(self) -> int:
    return self.encoder_embed_dim // self.encoder_attention_heads

  def num_tokens(self, num_frames: int) -> int:
    return (num_frames // self.input_patch_size) * (self.num_mel_bins // self.input_patch_size)


@struct.dataclass
class BeatsOutput:
  """features: last encoder output; padding_mask: token mask (True = padded) or None;
  hidden_states: each layer's output when asked for, else None."""

  features: Float[Array, "B N D"]
  padding_mask: Bool[Array, "B N"] | None = None
  hidden_states: tuple[Float[Array, "B N D"], ...] | None = None


def reduce_padding_mask(mask: Bool[Array, "B T"], length: int) -> Bool[Array, "B L"]:
  """LAVIS' `forward_padding_mask`: drop `T % length` trailing frames, view as (B, length, -1)
  and keep an entry only where all its frames are padded."""
  batch, frames = mask.shape
  kept = frames - frames % length
  if kept == 0:  # an empty group: `all` over nothing is True, as in torch
    return jnp.ones((batch, length), bool)
  return jnp.all(mask[:, :kept].reshape(batch, length, kept // length), axis=-1)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5-style buckets of (key - query), (length, length) int32.

  Evaluated in float32 as the reference does (so bucket edges round the same way), at trace time.
  """
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  # Distances below max_exact never use this branch; clamp them to 1 to keep the log finite.
  ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)
  large = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
           * np.float32(half - max_exact))
  large = np.minimum(max_exact + large.astype(np.int64), half - 1)  # int cast truncates
  return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class WeightNormConv1d(nnx.Module):
  """Grouped Conv1d with torch `weight_norm(dim=2)` parameters, then SamePad and GELU.

  `weight_v` is stored as (kernel, in/groups, out); `weight_g` as (kernel,).
  """

  def __init__(self, features: int, kernel: int, groups: int, *, precision: Precision,
               rngs: nnx.Rngs):
    self.kernel, self.groups, self.precision = kernel, groups, precision
    pdt = precision.jnp_param_dtype
    init = nnx.initializers.normal(math.sqrt(4.0 / (kernel * features)))
    v = init(rngs.params(), (kernel, features // groups, features), pdt)
    self.weight_v = nnx.Param(v, out_sharding=("kernel", "conv_in", "conv_out"))
    g = jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=(1, 2))).astype(pdt)
    self.weight_g = nnx.Param(g, out_sharding=("kernel",))
    self.bias = nnx.Param(jnp.zeros((features,), pdt), out_sharding=("conv_out",))

  def weight(self) -> Float[Array, "K I O"]:
    v = self.weight_v[...].astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
    return v * (self.weight_g[...].astype(jnp.float32)[:, None, None] / norm)

  def __call__(self, x: Float[Array, "B N D"]) -> Float[Array, "B N D"]:
    dtype = self.precision.jnp_dtype
    pad = self.kernel // 2
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), self.weight().astype(dtype), window_strides=(1,),
        padding=[(pad, pad)], dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=self.groups, precision=self.precision.lax_precision)
    if self.kernel % 2 == 0:  # SamePad: an even kernel yields one extra step
      y = y[:, :-1]
    y = y + self.bias[...].astype(dtype)
    return layers.gelu_exact(y.astype(jnp.float32)).astype(dtype)


class BeatsAttention(nnx.Module):
  """fairseq-style self-attention with BEATs' score rescaling and gated relative bias."""

  def __init__(self, cfg: BeatsConfig, *, precision: Precision, rngs: nnx.Rngs):
    d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
    self.cfg, self.precision = cfg, precision
    proj = lambda a: layers.dense(d, d, a, precision=precision, rngs=rngs)
    self.q_proj = proj(("embed", "heads"))
    self.k_proj = proj(("embed", "heads"))
    self.v_proj = proj(("embed", "heads"))
    self.out_proj = proj(("heads", "embed"))
    if cfg.gru_rel_pos:
      self.grep_linear = layers.dense(cfg.head_dim, 8, (None, None), precision=precision, rngs=rngs)
      self.grep_a = nnx.Param(jnp.ones((h,), precision.jnp_param_dtype), out_sharding=(None,))

  def __call__(self, x: Float[Array, "B N D"], key_padding_mask: Bool[Array, "B N"] | None,
               position_bias: Float[Array, "H N N"] | None) -> Float[Array, "B N D"]:
    cfg, dtype, prec = self.cfg, self.precision.jnp_dtype, self.precision.lax_precision
    b, n, _ = x.shape
    h, hd = cfg.encoder_attention_heads, cfg.head_dim
    q = self.q_proj(x).reshape(b, n, h, hd)
    k = self.k_proj(x).reshape(b, n, h, hd)
    v = self.v_proj(x).reshape(b, n, h, hd)
    q_scaled = q * jnp.asarray(hd**-0.5, q.dtype) * jnp.asarray(1.0 / _ATTN_ALPHA, q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_scaled, k, precision=prec,
                        preferred_element_type=jnp.float32)
    # Subtracting the row max before undoing the 1/32 keeps the logits small (as the reference).
    scores = (scores - jnp.max(scores, axis=-1, keepdims=True)) * _ATTN_ALPHA
    if key_padding_mask is not None:
      scores = jnp.where(key_padding_mask[:, None, None, :], -jnp.inf, scores)
    if position_bias is not None:
      bias = position_bias[None].astype(jnp.float32)
      if cfg.gru_rel_pos:
        gates = self.grep_linear(q).astype(jnp.float32).reshape(b, n, h, 2, 4).sum(-1)
        gates = jax.nn.sigmoid(gates)
        grep_a = self.grep_a[...].astype(jnp.float32)[None, None, :]
        gate = gates[..., 0] * (gates[..., 1] * grep_a - 1.0) + 2.0  # (B, N, H)
        bias = jnp.transpose(gate, (0, 2, 1))[..., None] * bias
      scores = scores + bias
    probs = layers.softmax_f32(scores, dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype), precision=prec)
    return self.out_proj(out.reshape(b, n, h * hd))


class BeatsLayer(nnx.Module):
  """Transformer layer: post-LN with deep-norm residual scaling (or pre-LN if configured)."""

  def __init__(self, cfg: BeatsConfig, *, precision: Precision, rngs: nnx.Rngs):
    d, pdt = cfg.encoder_embed_dim, precision.jnp_param_dtype
    self.layer_norm_first = cfg.layer_norm_first
    self.alpha = (2.0 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0
    self.self_attn = BeatsAttention(cfg, precision=precision, rngs=rngs)
    ln = lambda: layers.LayerNorm(d, eps=cfg.layer_norm_eps, axis_name="norm", param_dtype=pdt)
    self.self_attn_layer_norm = ln()
    self.fc1 = layers.dense(d, cfg.encoder_ffn_embed_dim, ("embed", "mlp"), precision=precision,
                      rngs=rngs)
    self.fc2 = layers.dense(cfg.encoder_ffn_embed_dim, d, ("mlp", "embed"), precision=precision,
                      rngs=rngs)
    self.final_layer_norm = ln()

  def _ffn(self, x: Array) -> Array:
    y = self.fc1(x)
    return self.fc2(layers.gelu_exact(y.astype(jnp.float32)).astype(y.dtype))

  def __call__(self, x: Float[Array, "B N D"], padding_mask: Bool[Array, "B N"] | None,
               position_bias: Float[Array, "H N N"] | None) -> Float[Array, "B N D"]:
    if self.layer_norm_first:
      x = x + self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias)
      return x + self._ffn(self.final_layer_norm(x))
    x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, padding_mask, position_bias))
    return self.final_layer_norm(x * self.alpha + self._ffn(x))


class BeatsEncoder(nnx.Module):
  """Convolutional position embedding, shared relative position table, transformer layers."""

  def __init__(self, cfg: BeatsConfig, *, precision: Precision, rngs: nnx.Rngs):
    d = cfg.encoder_embed_dim
    self.cfg = cfg
    self.pos_conv = WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups, precision=precision,
                                     rngs=rngs)
    if cfg.relative_position_embedding:
      # One table for all layers (LAVIS ties layers i > 0 to layer 0's module).
      table = nnx.initializers.normal(0.02)(
          rngs.params(), (cfg.num_buckets, cfg.encoder_attention_heads),
          precision.jnp_param_dtype)
      self.relative_attention_bias = nnx.Param(table, out_sharding=(None, None))
    self.layers = nnx.List([BeatsLayer(cfg, precision=precision, rngs=rngs)
                            for _ in range(cfg.encoder_layers)])
    self.layer_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, axis_name="norm",
                                       param_dtype=precision.jnp_param_dtype)

  def relative_position_bias(self, length: int) -> Float[Array, "H N N"]:
    """The ungated bias every layer starts from: table[bucket(k - q)], as (heads, N, N)."""
    buckets = relative_position_buckets(length, self.cfg.num_buckets, self.cfg.max_distance)
    values = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), buckets, axis=0)
    return jnp.transpose(values, (2, 0, 1))

  def __call__(self, x: Float[Array, "B N D"], padding_mask: Bool[Array, "B N"] | None = None,
               *, output_hidden_states: bool = False):
    if padding_mask is not None:
      x = jnp.where(padding_mask[..., None], jnp.zeros((), x.dtype), x)
    x = x + self.pos_conv(x)
    if not self.cfg.layer_norm_first:
      x = self.layer_norm(x)
    bias = (self.relative_position_bias(x.shape[1]) if self.cfg.relative_position_embedding
            else None)
    hidden = []
    for layer in self.layers:
      x = layer(x, padding_mask, bias)
      hidden.append(x)
    if self.cfg.layer_norm_first:
      x = self.layer_norm(x)
    return x, (tuple(hidden) if output_hidden_states else None)


class Beats(nnx.Module):
  """BEATs feature extractor: normalised fbank (B, T, F) -> token features (B, N, D)."""

  def __init__(self, cfg: BeatsConfig, *, precision: Precision, rngs: nnx.Rngs):
    self.cfg, self.precision = cfg, precision
    p, e, pdt = cfg.input_patch_size, cfg.embed_dim, precision.jnp_param_dtype
    self.patch_embedding = nnx.Conv(
        1, e, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=cfg.conv_bias,
        dtype=precision.jnp_dtype, param_dtype=pdt, precision=precision.lax_precision,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          ("kernel", "kernel", "conv_in", "conv_out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs)
    self.layer_norm = layers.LayerNorm(e, eps=cfg.layer_norm_eps, axis_name="norm",
                                       param_dtype=pdt)
    if e != cfg.encoder_embed_dim:
      self.post_extract_proj = layers.dense(e, cfg.encoder_embed_dim, ("conv_out", "embed"),
                                      precision=precision, rngs=rngs)
    else:
      self.post_extract_proj = None
    self.encoder = BeatsEncoder(cfg, precision=precision, rngs=rngs)

  def patch_features(self, fbank: Float[Array, "B T F"]) -> Float[Array, "B N E"]:
    """Patch embedding, flattened time-major, then `layer_norm` (before the projection)."""
    x = self.patch_embedding(fbank.astype(self.precision.jnp_dtype)[..., None])  # (B, Tp, Fp, E)
    b, tp, fp, e = x.shape
    return self.layer_norm(x.reshape(b, tp * fp, e))

  def __call__(self, fbank: Float[Array, "B T F"], padding_mask: Bool[Array, "B T"] | None = None,
               *, output_hidden_states: bool = False) -> BeatsOutput:
    """`BEATs.extract_features(fbank, padding_mask)` (no predictor head).

    Args:
      fbank: normalised log-mel frames (see `xblip_jax.data.preprocess.audio_fbank`).
      padding_mask: frame-level mask, True on padded frames.
      output_hidden_states: also return every layer's output.
    """
    if padding_mask is not None:  # the reference reduces the mask to frames first (a no-op)
      padding_mask = reduce_padding_mask(padding_mask, fbank.shape[1])
    x = self.patch_features(fbank)
    if padding_mask is not None:
      padding_mask = reduce_padding_mask(padding_mask, x.shape[1])
    if self.post_extract_proj is not None:
      x = self.post_extract_proj(x)
    x, hidden = self.encoder(x, padding_mask, output_hidden_states=output_hidden_states)
    return BeatsOutput(features=x, padding_mask=padding_mask, hidden_states=hidden)

  def encode_clips(self, fbank_clips: Float[Array, "B C T F"]) -> Float[Array, "B C N D"]:
    """X-InstructBLIP's audio path: every clip encoded on its own, without a padding mask.

    Clips never attend to each other, so folding them into the batch gives the per-clip result.
    """
    b, c, t, f = fbank_clips.shape
    out = self(fbank_clips.reshape(b * c, t, f)).features
    return out.reshape(b, c, *out.shape[1:])
