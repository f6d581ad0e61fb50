"""Key/value cache for incremental LLaMA decoding with static shapes.

The cache is a plain pytree (`flax.struct.dataclass`), so it can be the carry of a
`jax.lax.while_loop` and be donated to a jitted step. Every array has a fixed shape; a call that
adds `T` tokens writes slots `[index, index + T)` with `lax.dynamic_update_slice` and advances
`index` by `T`. Slots at or after `index` are never attended to (the causal test runs in slot
space), so their contents do not matter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int


@struct.dataclass
class KVCache:
  """Keys and values of every layer, stacked along a leading layer axis.

  Attributes:
    k: rotated keys, `(layers, batch, max_len, kv_heads, head_dim)`.
    v: values, same shape as `k`.
    mask: which slots hold real (non-padding) tokens, `(batch, max_len)`; written from the
      `attention_mask` of each call, so left padding of a prompt stays masked while decoding.
    index: number of slots written so far (the next write position), an int32 scalar.
  """

  k: Float[Array, "L B S KV Dh"]
  v: Float[Array, "L B S KV Dh"]
  mask: Bool[Array, "B S"]
  index: Int[Array, ""]

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  @classmethod
  def init(cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
           dtype=jnp.float32) -> "KVCache":
    """An empty cache (all slots masked, index 0)."""
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               mask=jnp.zeros((batch, max_len), jnp.bool_), index=jnp.zeros((), jnp.int32))

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


def update_layer(k_all: Float[Array, "L B S KV Dh"], v_all: Float[Array, "L B S KV Dh"],
                 k_new: Float[Array, "B T KV Dh"], v_new: Float[Array, "B T KV Dh"],
                 layer: int, index: Int[Array, ""]
                 ) -> tuple[Float[Array, "L B S KV Dh"], Float[Array, "L B S KV Dh"]]:
  """Writes one layer's new keys/values at slot `index` of the stacked cache, in place under jit."""
  start = (layer, 0, index, 0, 0)
  k_all = jax.lax.dynamic_update_slice(k_all, k_new[None].astype(k_all.dtype), start)
  v_all = jax.lax.dynamic_update_slice(v_all, v_new[None].astype(v_all.dtype), start)
  return k_all, v_all
