"""EVA-CLIP ViT-g/14 image encoder as X-InstructBLIP (LAVIS `create_eva_vit_g`) uses it.

Facts reproduced from the reference:
  * pre-LN blocks, LayerNorm eps 1e-6, exact (erf) GELU, MLP hidden `int(width * mlp_ratio)`;
  * fused qkv projection without bias; the bias added is `cat(q_bias, 0, v_bias)` (no key bias);
  * q is scaled by `head_dim ** -0.5` before `q @ k^T`;
  * CLS token first, learned absolute position embedding (no relative bias, no layer scale);
  * no final norm: the output is the last block's output (the modality LayerNorm `image_ln`,
    eps 1e-5, belongs to the bridge);
  * 39 blocks for ViT-g (EVA-CLIP-g has 40; BLIP-2 drops the last).

Images are NHWC. Position embeddings are bicubically resampled (PyTorch `interpolate`,
`mode="bicubic"`, `align_corners=False`) when a checkpoint or an input has another grid size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from xblip_jax.models.layers import LayerNorm, Precision, dense, gelu_exact, softmax_f32
from xblip_jax.models.remat import checkpointed

# PyTorch's bicubic kernel constant (Keys' "a"); jax.image.resize uses -0.5 and antialiasing.
_CUBIC_A = -0.75


@dataclasses.dataclass(frozen=True)
class EvaViTConfig:
  """Architecture of the EVA ViT.

  Attributes:
    img_size: square input size the position embedding is laid out for.
    patch_size: square patch (and stride) of the patch-embedding convolution.
    width: residual stream width.
    depth: number of transformer blocks.
    num_heads: attention heads (head dim = width // num_heads).
    mlp_ratio: MLP hidden = `int(width * mlp_ratio)` (truncation, as the reference).
    layer_norm_eps: eps of the block LayerNorms.
    in_chans: input channels.
    remat: rematerialise each block in the backward pass (memory for compute).
  """

  img_size: int = 224
  patch_size: int = 14
  width: int = 1408
  depth: int = 39
  num_heads: int = 16
  mlp_ratio: float = 4.3637
  layer_norm_eps: float = 1e-6
  in_chans: int = 3
  remat: bool = False

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def num_tokens(self) -> int:
    return self.num_patches + 1

  @classmethod
  def eva_vit_g(cls, **overrides) -> "EvaViTConfig":
    """EVA-CLIP ViT-g/14 at 224px, 39 blocks: 257 tokens of width 1408."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, img_size: int = 32, patch_size: int = 8, width: int = 48, depth: int = 2,
           num_heads: int = 4, **overrides) -> "EvaViTConfig":
    """The golden-case scale (img 32, patch 8, width 48, depth 2, heads 4)."""
    return cls(img_size=img_size, patch_size=patch_size, width=width, depth=depth,
               num_heads=num_heads, **overrides)


def eva_vit_g(**overrides) -> EvaViTConfig:
  return EvaViTConfig.eva_vit_g(**overrides)


def tiny(**kwargs) -> EvaViTConfig:
  return EvaViTConfig.tiny(**kwargs)


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling (PyTorch bicubic, align_corners=False, no antialias).


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """The four tap weights for fractional offsets `t` (taps at floor-1 .. floor+2)."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`(n_out, n_in)` matrix of 1-D PyTorch bicubic resampling (border taps clamped)."""
  scale = n_in / n_out
  src = scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), weights[:, k])
  return m


def _as_grid(grid: int | Sequence[int]) -> tuple[int, int]:
  return (grid, grid) if isinstance(grid, (int, np.integer)) else (int(grid[0]), int(grid[1]))


def interpolate_pos_embed(pos_embed, new_grid: int | Sequence[int], *, num_extra_tokens: int = 1):
  """Resamples `(..., extra + g*g, D)` position embeddings to a `new_grid` of patches.

  As LAVIS `interpolate_pos_embed`: the source grid is `int(sqrt(N - extra))` square, the extra
  (CLS) rows are kept, the patch rows are resampled bicubically (PyTorch semantics) and nothing
  changes when the grids already agree. Works on numpy (converter) and JAX arrays (traced).

  Args:
    pos_embed: position embeddings, CLS row(s) first.
    new_grid: target patch grid, `g` or `(h, w)`.
    num_extra_tokens: leading rows that are not patch positions.

  Returns:
    An array of the same kind and dtype with `extra + h*w` rows.
  """
  h, w = _as_grid(new_grid)
  n = pos_embed.shape[-2] - num_extra_tokens
  old = int(math.isqrt(n))
  if old * old != n:
    raise ValueError(f"position embedding with {n} patch rows is not a square grid")
  if (old, old) == (h, w):
    return pos_embed
  lead, d = pos_embed.shape[:-2], pos_embed.shape[-1]
  mh, mw = bicubic_matrix(old, h), bicubic_matrix(old, w)
  if isinstance(pos_embed, np.ndarray):
    grid = pos_embed[..., num_extra_tokens:, :].astype(np.float64).reshape(*lead, old, old, d)
    out = np.einsum("ip,jq,...pqd->...ijd", mh, mw, grid).reshape(*lead, h * w, d)
    out = np.concatenate([pos_embed[..., :num_extra_tokens, :].astype(np.float64), out], axis=-2)
    return out.astype(pos_embed.dtype)
  grid = pos_embed[..., num_extra_tokens:, :].astype(jnp.float32).reshape(*lead, old, old, d)
  out = jnp.einsum("ip,jq,...pqd->...ijd", jnp.asarray(mh, jnp.float32),
                   jnp.asarray(mw, jnp.float32), grid, precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(*lead, h * w, d).astype(pos_embed.dtype)
  return jnp.concatenate([pos_embed[..., :num_extra_tokens, :], out], axis=-2)


# ----------------------------------------------------------------------------------------------
# Modules.


class Attention(nnx.Module):
  """Multi-head self-attention with a fused bias-free qkv and separate q/v biases."""

  def __init__(self, cfg: EvaViTConfig, *, precision: Precision, rngs: nnx.Rngs):
    d = cfg.width
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.precision = precision
    self.qkv = dense(d, 3 * d, ("embed", "heads"), precision=precision, rngs=rngs,
                     use_bias=False)
    zeros = jnp.zeros((d,), precision.jnp_param_dtype)
    self.q_bias = nnx.Param(zeros, out_sharding=("heads",))
    self.v_bias = nnx.Param(zeros, out_sharding=("heads",))
    self.proj = dense(d, d, ("heads", "embed"), precision=precision, rngs=rngs)

  def __call__(self, x: Float[Array, "B N D"]) -> Float[Array, "B N D"]:
    b, n, _ = x.shape
    dtype = self.precision.jnp_dtype
    q_bias = self.q_bias[...].astype(dtype)
    bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...].astype(dtype)])
    qkv = (self.qkv(x) + bias).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * jnp.asarray(self.head_dim ** -0.5, dtype)
    prec = self.precision.lax_precision
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec)
    probs = softmax_f32(scores, dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=prec)
    return self.proj(out.reshape(b, n, -1))


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2."""

  def __init__(self, cfg: EvaViTConfig, *, precision: Precision, rngs: nnx.Rngs):
    self.fc1 = dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), precision=precision, rngs=rngs)
    self.fc2 = dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), precision=precision, rngs=rngs)

  def __call__(self, x: Float[Array, "B N D"]) -> Float[Array, "B N D"]:
    return self.fc2(gelu_exact(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LN transformer block (no layer scale, no drop path at inference)."""

  def __init__(self, cfg: EvaViTConfig, *, precision: Precision, rngs: nnx.Rngs):
    ln = dict(eps=cfg.layer_norm_eps, axis_name="norm", param_dtype=precision.jnp_param_dtype)
    self.norm1 = LayerNorm(cfg.width, **ln)
    self.attn = Attention(cfg, precision=precision, rngs=rngs)
    self.norm2 = LayerNorm(cfg.width, **ln)
    self.mlp = Mlp(cfg, precision=precision, rngs=rngs)

  def __call__(self, x: Float[Array, "B N D"]) -> Float[Array, "B N D"]:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def _run_block(block: Block, x: Array) -> Array:
  return block(x)


class EvaViT(nnx.Module):
  """EVA-CLIP ViT: NHWC pixels -> `(B, 1 + patches, width)` last-block features, CLS first."""

  def __init__(self, cfg: EvaViTConfig, *, precision: Precision, rngs: nnx.Rngs):
    self.cfg = cfg
    self.precision = precision
    p, d = cfg.patch_size, cfg.width
    pdt = precision.jnp_param_dtype
    self.patch_embed = nnx.Conv(
        cfg.in_chans, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
        dtype=precision.jnp_dtype, param_dtype=pdt, precision=precision.lax_precision,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          ("kernel", "kernel", "conv_in", "embed")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (d,), pdt), out_sharding=("embed",))
    self.pos_embed = nnx.Param(init(rngs.params(), (cfg.num_tokens, d), pdt),
                               out_sharding=("seq", "embed"))
    self.blocks = nnx.List([Block(cfg, precision=precision, rngs=rngs) for _ in range(cfg.depth)])

  def embed(self, pixels: Float[Array, "B H W C"]) -> Float[Array, "B N D"]:
    """Patch embedding, CLS token and (resampled if the grid differs) position embedding."""
    dtype = self.precision.jnp_dtype
    patches = self.patch_embed(pixels.astype(dtype))
    b, gh, gw, d = patches.shape
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches.reshape(b, gh * gw, d)], axis=1)
    pos = interpolate_pos_embed(self.pos_embed[...], (gh, gw))
    return x + pos.astype(dtype)[None]

  def hidden_states(self, pixels: Float[Array, "B H W C"]) -> list[Float[Array, "B N D"]]:
    """The output of every block (the last one is `__call__`'s result)."""
    return self._forward(pixels, collect=True)

  def __call__(self, pixels: Float[Array, "B H W C"]) -> Float[Array, "B N D"]:
    """Features of the last block, `(B, 1 + (H//p)*(W//p), width)`, CLS first, no final norm."""
    return self._forward(pixels, collect=False)[-1]

  def encode_video(self, pixels: Float[Array, "B T H W C"]) -> Float[Array, "B T N D"]:
    """Every frame through the same encoder independently; frame order kept, sample-major."""
    b, t = pixels.shape[:2]
    feats = self(pixels.reshape(b * t, *pixels.shape[2:]))
    return feats.reshape(b, t, *feats.shape[1:])

  def _forward(self, pixels: Array, *, collect: bool) -> list[Array]:
    x = self.embed(pixels)
    run = checkpointed(_run_block) if self.cfg.remat else _run_block
    outs = []
    for block in self.blocks:
      x = run(block, x)
      if collect:
        outs.append(x)
    return outs if collect else [x]


def param_count(model_or_state) -> int:
  """Number of parameter scalars (works on abstract states from `nnx.eval_shape`)."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
