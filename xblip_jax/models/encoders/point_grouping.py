"""Point-cloud grouping for PointBERT: farthest point sampling, kNN and neighbourhoods, in JAX.

Pure JAX (no CUDA extension), jit-able, deterministic:

- `farthest_point_sample` starts at point 0 (as pointnet2's CUDA kernel and the golden; LAVIS' torch
  version starts at a random index). Each step keeps, per point, the smallest squared distance to
  the chosen centres (initialised to 1e10) and picks the first index of the largest one.
- `knn_indices` returns the k nearest points of every centre, nearest first, ties to the lower
  index. Distances are direct differences ``((dx*dx + dy*dy) + dz*dz)`` rather than the
  ``|a|^2 + |b|^2 - 2ab`` expansion LAVIS uses: the expansion loses most of its bits to
  cancellation for the small distances that decide a neighbourhood, while direct differences stay
  within a few float32 ulps of the exact value and pick the same sets as a float64 computation
  unless two candidates are closer than ~1e-7 relative.

Indices are int32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# LAVIS' initial "distance to the nearest centre" before any centre is chosen.
_FPS_INIT_DISTANCE = 1e10


def squared_distance(a: Float[Array, "... 3"], b: Float[Array, "... 3"]) -> Float[Array, "..."]:
  """Squared Euclidean distance from direct differences, summed x, y, z in that order."""
  d = a - b
  return (d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]) + d[..., 2] * d[..., 2]


def gather_points(points: Float[Array, "B N C"], idx: Int[Array, "B *S"]) -> Float[Array, "B *S C"]:
  """`points[b, idx[b, ...]]` for every batch row."""
  return jax.vmap(lambda p, i: p[i])(points, idx)


def farthest_point_sample(xyz: Float[Array, "B N 3"], num_samples: int) -> Int[Array, "B S"]:
  """Indices of `num_samples` farthest-point-sampled centres, starting from point 0.

  Args:
    xyz: point coordinates; computed in float32 whatever the input dtype.
    num_samples: number of centres S (static), at most N.

  Returns:
    int32 indices (B, S), in the order they were chosen.
  """
  batch, num_points, _ = xyz.shape
  if not 0 < num_samples <= num_points:
    raise ValueError(f"cannot sample {num_samples} centres from {num_points} points")
  xyz = xyz.astype(jnp.float32)

  def step(i, carry):
    chosen, nearest, current = carry
    chosen = chosen.at[:, i].set(current)
    centre = gather_points(xyz, current[:, None])  # (B, 1, 3)
    nearest = jnp.minimum(nearest, squared_distance(xyz, centre))
    # argmax returns the first index among equal maxima, as torch.max does.
    return chosen, nearest, jnp.argmax(nearest, axis=-1).astype(jnp.int32)

  init = (jnp.zeros((batch, num_samples), jnp.int32),
          jnp.full((batch, num_points), _FPS_INIT_DISTANCE, jnp.float32),
          jnp.zeros((batch,), jnp.int32))
  chosen, _, _ = jax.lax.fori_loop(0, num_samples, step, init)
  return chosen


def knn_indices(xyz: Float[Array, "B N 3"], centers: Float[Array, "B G 3"],
                k: int) -> Int[Array, "B G K"]:
  """The `k` nearest points of each centre, by increasing distance (ties: lower index first).

  Args:
    xyz: all points.
    centers: query points.
    k: neighbours per centre (static), at most N.

  Returns:
    int32 indices into `xyz`, shape (B, G, k).
  """
  num_points = xyz.shape[1]
  if not 0 < k <= num_points:
    raise ValueError(f"cannot take {k} neighbours among {num_points} points")
  dist = squared_distance(centers.astype(jnp.float32)[:, :, None, :],
                          xyz.astype(jnp.float32)[:, None, :, :])  # (B, G, N)
  # top_k orders equal values by lower index, so this is a stable ascending sort's first k.
  _, idx = jax.lax.top_k(-dist, k)
  return idx.astype(jnp.int32)


def group_points(xyz: Float[Array, "B N 3"], num_group: int, group_size: int):
  """PointBERT's `Group`: FPS centres, their kNN neighbourhoods, each relative to its centre.

  Args:
    xyz: point coordinates (float32 recommended; grouping always runs in float32).
    num_group: number of centres G.
    group_size: points per neighbourhood M.

  Returns:
    `(center_idx (B, G), knn_idx (B, G, M), centers (B, G, 3), neighborhood (B, G, M, 3))`, where
    ``neighborhood[b, g, m] = xyz[b, knn_idx[b, g, m]] - centers[b, g]``.
  """
  xyz = xyz.astype(jnp.float32)
  center_idx = farthest_point_sample(xyz, num_group)
  centers = gather_points(xyz, center_idx)
  knn_idx = knn_indices(xyz, centers, group_size)
  neighborhood = gather_points(xyz, knn_idx) - centers[:, :, None, :]
  return center_idx, knn_idx, centers, neighborhood
