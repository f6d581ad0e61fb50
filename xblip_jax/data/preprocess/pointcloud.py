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


def farthest_point_sample(points: Float[np.ndarray, "N C"], npoints: int,
                          rng: np.random.Generator) -> Float[np.ndarray, "npoints C"]:
  """Greedy farthest point sampling from a random start point (xyz distances)."""
  n = points.shape[0]
  xyz = points[:, :3].astype(np.float64)
  chosen = np.empty(npoints, np.int64)
  distance = np.full(n, np.inf)
  current = int(rng.integers(n))
  for i in range(npoints):
    chosen[i] = current
    distance = np.minimum(distance, ((xyz - xyz[current]) ** 2).sum(axis=1))
    current = int(np.argmax(distance))
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
