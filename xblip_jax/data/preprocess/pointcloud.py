"""Point-cloud loading and the reference's ULIP preprocessing, in NumPy.

`pc_norm`: subtract the centroid, divide by the largest point norm (unit sphere). Then exactly
`npoints` (8192) points: farthest point sampling from a random start when the file has more,
a random permutation when it has exactly that many, and (a deliberate fix) every point once
plus random repeats when it has fewer (the reference's processor raises an IndexError there).
Only xyz is kept (PointBERT groups xyz; colours and normals are dropped). Non-finite values
are rejected with a `MediaError` naming the file. Output: float32 (npoints, 3).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
from jaxtyping import Float

from xblip_jax.data.example import MediaError

N_POINTS = 8192


def _read_ply(path: str | os.PathLike) -> np.ndarray:
  try:
    from plyfile import PlyData  # lazily: only .ply files need it
  except ImportError:
    raise MediaError(path, "reading .ply needs the 'plyfile' package") from None
  try:
    vertex = PlyData.read(str(path))["vertex"]
    return np.stack([np.asarray(vertex[k], np.float32) for k in ("x", "y", "z")], axis=1)
  except (KeyError, ValueError, EOFError, OSError, IndexError) as e:
    raise MediaError(path, f"cannot read ply ({e})") from None


def load_points(path: str | os.PathLike) -> Float[np.ndarray, "N 3"]:
  """xyz of a `.npz` (array `arr_0`, ULIP's Objaverse files), `.npy` or `.ply` point cloud."""
  suffix = os.path.splitext(str(path))[1].lower()
  if not os.path.exists(path):
    raise MediaError(path, "file not found")
  if suffix == ".ply":
    points = _read_ply(path)
  else:
    try:
      if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
          if "arr_0" not in archive:
            raise MediaError(path, f"no 'arr_0' array (has {sorted(archive.files)})")
          points = archive["arr_0"]
      else:
        points = np.load(path, allow_pickle=False)
    except MediaError:
      raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise MediaError(path, f"cannot read point cloud ({e})") from None
  points = np.asarray(points)
  if points.ndim != 2 or points.shape[1] < 3 or points.shape[0] == 0:
    raise MediaError(path, f"expected an (N, >=3) array of points, got shape {points.shape}")
  if not np.issubdtype(points.dtype, np.number):
    raise MediaError(path, f"non-numeric point array ({points.dtype})")
  points = points[:, :3].astype(np.float32)
  if not np.isfinite(points).all():
    raise MediaError(path, f"{int((~np.isfinite(points)).any(axis=1).sum())} points hold NaN "
                     "or inf")
  return points


def pc_norm(points: Float[np.ndarray, "N C"]) -> Float[np.ndarray, "N C"]:
  """Centre on the centroid and scale into the unit sphere; ValueError if all points coincide."""
  centred = points - points.mean(axis=0)
  radius = float(np.sqrt((centred ** 2).sum(axis=1)).max())
  if not np.isfinite(radius) or radius == 0.0:
    raise ValueError("degenerate point cloud (all points coincide)")
  return (centred / radius).astype(np.float32)


FPS_BLOCK = 128  # points per spatial block of `farthest_point_sample`


def _morton_order(xyz: Float[np.ndarray, "N 3"], bits: int = 10) -> np.ndarray:
  """Indices sorting the points along a Z-order curve, so that runs of them are compact."""
  lo, span = xyz.min(axis=0), np.ptp(xyz, axis=0)
  q = ((xyz - lo) / np.where(span > 0, span, 1.0) * (2 ** bits - 1)).astype(np.uint64)
  code = np.zeros(len(xyz), np.uint64)
  for b in range(bits):
    for k in range(3):
      code |= ((q[:, k] >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + k)
  return np.argsort(code, kind="stable")


def farthest_point_sample(points: Float[np.ndarray, "N C"], npoints: int,
                          rng: np.random.Generator) -> Float[np.ndarray, "npoints C"]:
  """Greedy farthest point sampling from a random start point (xyz distances).

  The same picks as the textbook loop (float64 squared distances, running minimum, first
  index of the maximum), but each step only updates the blocks of nearby points: points are
  cut into blocks of `FPS_BLOCK` along a Z-order curve, and a block whose bounding box is
  farther from the new centre than its largest running distance cannot change (a 1e-9
  margin covers rounding). Each block lists its points in input order, so the first maximum
  of a block, and the smallest index among equal block maxima, is the textbook argmax.
  """
  n = points.shape[0]
  xyz = points[:, :3].astype(np.float64)
  current = int(rng.integers(n))
  nblocks = -(-n // FPS_BLOCK)
  members = np.full(nblocks * FPS_BLOCK, n, np.int64)
  members[:n] = _morton_order(xyz)
  members = np.sort(members.reshape(nblocks, FPS_BLOCK), axis=1)  # padding (= n) last
  padding = members == n
  coords = xyz[np.where(padding, members[:, :1], members)].transpose(2, 0, 1)  # (3, nb, B)
  coords = np.ascontiguousarray(coords)
  lo, hi = coords.min(axis=2), coords.max(axis=2)                               # (3, nb)
  distance = np.where(padding, -np.inf, np.inf)
  block_max, block_arg = np.full(nblocks, np.inf), np.zeros(nblocks, np.int64)
  chosen = np.empty(npoints, np.int64)
  for i in range(npoints):
    chosen[i] = current
    centre = xyz[current][:, None]
    gap = np.maximum(np.maximum(lo - centre, centre - hi), 0.0)
    near = np.flatnonzero((gap * gap).sum(axis=0) * (1 - 1e-9) <= block_max)
    sub = coords[:, near]                                  # (3, k, B)
    d = (sub[0] - centre[0]) ** 2 + (sub[1] - centre[1]) ** 2
    d += (sub[2] - centre[2]) ** 2                        # the textbook (x2 + y2) + z2
    d = np.minimum(distance[near], d)
    distance[near] = d
    arg = d.argmax(axis=1)
    block_max[near] = d[np.arange(len(near)), arg]
    block_arg[near] = members[near, arg]
    current = int(block_arg[block_max == block_max.max()].min())
  return points[chosen]


def sample_points(points: Float[np.ndarray, "N C"], npoints: int,
                  rng: np.random.Generator) -> Float[np.ndarray, "npoints C"]:
  """FPS when there are more points, a permutation when exactly `npoints`, and when fewer
  every point once plus random repeats (in random order)."""
  n = points.shape[0]
  if n > npoints:
    return farthest_point_sample(points, npoints, rng)
  if n == npoints:
    return points[rng.permutation(n)]
  extra = rng.integers(0, n, size=npoints - n)
  return points[rng.permutation(np.concatenate([np.arange(n), extra]))]


def preprocess_pc(path: str | os.PathLike, *, rng: np.random.Generator,
                  npoints: int = N_POINTS) -> Float[np.ndarray, "npoints 3"]:
  """Loads, normalises and samples one point cloud (`rng` fixes the FPS start / order)."""
  points = load_points(path)
  try:
    normed = pc_norm(points)
  except ValueError as e:
    raise MediaError(path, str(e)) from None
  return sample_points(normed, npoints, rng)
