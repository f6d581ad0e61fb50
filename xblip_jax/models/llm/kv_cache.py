"""Key/value cache for incremental LLaMA decoding with static shapes.

The cache is a plain pytree (`flax.struct.dataclass`), so it can be the carry of a
`jax.lax.while_loop` and be donated to a jitted step. Every array has a fixed shape; a call that
adds `T` tokens writes slots `[index, index + T)` with `lax.dynamic_update_slice` and advances
`index` by `T`.

Layout (measured on the decoding benchmark, see bench/README.md): one array per layer, not one
stacked array (XLA:CPU copies a layer's slice of a stacked cache out before the attention
products read it, every step), and head-major `(batch, kv_heads, slots, head_dim)`, the layout
the products read (a slot-major cache was transposed at every step). Slots at or after `index` are never attended to (the causal test runs in slot
space), so their contents do not matter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int


@struct.dataclass
class KVCache:
  """Keys and values of every layer, one array per layer.

  Attributes:
    k: rotated keys per layer, each `(batch, kv_heads, max_len, head_dim)`.
    v: values, same shapes as `k`.
    mask: which slots hold real (non-padding) tokens, `(batch, max_len)`; written from the
      `attention_mask` of each call, so left padding of a prompt stays masked while decoding.
    index: number of slots written so far (the next write position), an int32 scalar.
  """

  k: tuple[Float[Array, "B KV S Dh"], ...]
  v: tuple[Float[Array, "B KV S Dh"], ...]
  mask: Bool[Array, "B S"]
  index: Int[Array, ""]

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]

  @property
  def batch_size(self) -> int:
    return self.mask.shape[0]

  @property
  def dtype(self):
    return self.k[0].dtype

  @classmethod
  def init(cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
           dtype=jnp.float32) -> "KVCache":
    """An empty cache (all slots masked, index 0)."""
    shape = (batch, num_kv_heads, max_len, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               mask=jnp.zeros((batch, max_len), jnp.bool_), index=jnp.zeros((), jnp.int32))

  def map_kv(self, fn) -> "KVCache":
    """This cache with `fn` applied to every layer's keys and values (e.g. a beam reorder)."""
    return self.replace(k=tuple(fn(x) for x in self.k), v=tuple(fn(x) for x in self.v))

  def repeat_rows(self, n: int) -> "KVCache":
    """Each batch row repeated `n` times, adjacent (beams or samples sharing a prefilled prompt)."""
    return self.map_kv(lambda x: jnp.repeat(x, n, axis=0)).replace(
        mask=jnp.repeat(self.mask, n, axis=0))

  def valid_counts(self) -> Int[Array, "B"]:
    """Number of real tokens stored per row (the next position under left padding)."""
    return jnp.sum(self.mask, axis=1, dtype=jnp.int32)

  def write_mask(self, new_mask: Bool[Array, "B T"]) -> "KVCache":
    """Records the key mask of `T` new tokens at slots `[index, index + T)`."""
    mask = jax.lax.dynamic_update_slice(self.mask, new_mask.astype(jnp.bool_), (0, self.index))
    return self.replace(mask=mask)

  def default_positions(self, new_mask: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """Positions of `T` new tokens: real tokens already cached plus `cumsum(new_mask) - 1`.

    Without padding this is `index + arange(T)` (HF's default with a cache); with a left-padded
    prompt it is HF generate's `cumsum(mask) - 1` convention continued through decoding.
    Padding tokens get the position of the previous real token (clipped at 0); their outputs are
    never attended to.
    """
    counts = self.valid_counts()[:, None]
    pos = counts + jnp.cumsum(new_mask.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(pos, 0)


def update_layer(k_all: tuple[Float[Array, "B KV S Dh"], ...],
                 v_all: tuple[Float[Array, "B KV S Dh"], ...],
                 k_new: Float[Array, "B KV T Dh"], v_new: Float[Array, "B KV T Dh"],
                 layer: int, index: Int[Array, ""]):
  """Writes one layer's new keys/values at slot `index` (in place under jit); returns the
  updated per-layer tuples."""
  def write(cache, new):
    layer_cache = jax.lax.dynamic_update_slice(cache[layer], new.astype(cache[layer].dtype),
                                               (0, 0, index, 0))
    return cache[:layer] + (layer_cache,) + cache[layer + 1:]

  return write(k_all, k_new), write(v_all, v_new)
