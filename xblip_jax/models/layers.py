"""Building blocks shared by every tower: precision policy, dense and norm layers.

Every parameter is created with logical axis names (see `xblip_jax/sharding.py` for the one
place that maps them onto mesh axes). Eager sharding is off: parameters carry their logical
names as metadata and are placed on devices by the trainer, never at construction time.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

# Logical names are metadata only; the trainer shards explicitly (see sharding.py).
nnx.use_eager_sharding(False)

DType = jnp.dtype | type


@dataclasses.dataclass(frozen=True)
class Precision:
  """Per-module dtype policy.

  Attributes:
    param_dtype: dtype parameters are stored in.
    dtype: dtype matmuls and activations run in. LayerNorm/RMSNorm statistics and softmax are
      always computed in float32 regardless of this (the reference does the same under autocast).
    matmul_precision: XLA precision for dot products; "highest" keeps float32 exact on GPU/TPU.
  """

  param_dtype: str = "float32"
  dtype: str = "float32"
  matmul_precision: str = "highest"

  @property
  def jnp_param_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def lax_precision(self) -> jax.lax.Precision:
    return jax.lax.Precision(self.matmul_precision.lower())

  @classmethod
  def float32(cls) -> "Precision":
    return cls()

  @classmethod
  def bf16_compute(cls) -> "Precision":
    """float32 master weights, bfloat16 compute (trainable towers at scale)."""
    return cls(param_dtype="float32", dtype="bfloat16", matmul_precision="default")

  @classmethod
  def bf16(cls) -> "Precision":
    """bfloat16 weights and compute (frozen towers at scale)."""
    return cls(param_dtype="bfloat16", dtype="bfloat16", matmul_precision="default")


def _partitioned(init, axes: Sequence[str | None]):
  return nnx.with_partitioning(init, tuple(axes))


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    precision: Precision,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    kernel_init=nnx.initializers.normal(0.02),
) -> nnx.Linear:
  """A Linear layer whose kernel `(in, out)` and bias `(out,)` carry logical axis names."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=precision.jnp_dtype,
      param_dtype=precision.jnp_param_dtype,
      precision=precision.lax_precision,
      kernel_init=_partitioned(kernel_init, axes),
      bias_init=_partitioned(nnx.initializers.zeros_init(), (axes[1],)),
      rngs=rngs,
  )


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 and cast back to the input dtype (as LAVIS' `LayerNorm`)."""

  def __init__(self, features: int, *, eps: float, axis_name: str = "embed",
               param_dtype: DType = jnp.float32, use_bias: bool = True):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(axis_name,))
    self.bias = (nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=(axis_name,))
                 if use_bias else None)

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: float32 statistics, weight applied in the input dtype (as HF LlamaRMSNorm)."""

  def __init__(self, features: int, *, eps: float, axis_name: str = "embed",
               param_dtype: DType = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(axis_name,))

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def gelu_exact(x: Array) -> Array:
  """The erf form of GELU used by BERT, EVA and BEATs (not the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


def softmax_f32(scores: Array, dtype: DType) -> Array:
  """Softmax in float32, cast to the compute dtype for the value product."""
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
