"""ModelNet40 as a 3D classification evaluation set, from ULIP's pre-sampled release.

Files (`modelnet40_normal_resampled/` in LAVIS' cache layout):
- `modelnet40_shape_names.txt`: the 40 class names, one a line, in label order; used as they
  are (underscores kept: "flower_pot"), as LAVIS' `ModelNetClassificationDataset` does;
- `modelnet40_test_8192pts_fps.dat`: a pickle of `[list_of_points, list_of_labels]`, each
  point set an (8192, 6) float32 array (xyz + normals, farthest-point sampled by ULIP), each
  label a length-1 int array;
- `modelnet40_test.txt` (optional here): the shape ids ("airplane_0627"), used as example ids.

The point clouds live inside one pickle, while the pipeline decodes media from one file per
example (`preprocess/pointcloud.py`: `pc_norm`, then a random permutation when a file holds
exactly 8192 points; the reference's `pc_normalize` and shuffle). So the reader writes each
point set's xyz once as `{index:05d}.npy` into a cache folder (`default_cache_dir`), with
`index.json` recording the labels and the `.dat`'s size and time stamp; later reads use the
cache without unpickling (the test split: 2,468 files, 240 MB). The `.dat` is
a pickle: read it only from a source you trust (ULIP's release).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build

SHAPE_NAMES = "modelnet40_shape_names.txt"
INDEX = "index.json"


def read_lines(path: str | os.PathLike) -> tuple[str, ...]:
  with open(path, encoding="utf-8") as f:
    return tuple(line.strip() for line in f if line.strip())


def _stamp(path: Path) -> dict[str, int]:
  st = path.stat()
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_cache_dir(dat_path: str | os.PathLike) -> Path:
  """`$XBLIP_CACHE_DIR` (default `~/.cache/xblip_jax`)`/modelnet40/<stem>-<hash of the path>`:
  outside the dataset folder, which may be read-only or shared."""
  dat = Path(dat_path).resolve()
  base = Path(os.environ.get("XBLIP_CACHE_DIR") or Path.home() / ".cache" / "xblip_jax")
  digest = hashlib.sha1(str(dat).encode()).hexdigest()[:12]
  return base / "modelnet40" / f"{dat.stem}-{digest}"


def _item(points: Any, label: Any, num_classes: int) -> tuple[np.ndarray, int]:
  """xyz and class index of one pickled item; RecordError when unusable."""
  pts = np.asarray(points) if isinstance(points, np.ndarray) else None
  if pts is None or pts.ndim != 2 or pts.shape[1] < 3 or pts.shape[0] == 0:
    raise RecordError("bad point array")
  try:
    index = int(np.asarray(label).reshape(-1)[0])
  except (TypeError, ValueError, IndexError):
    raise RecordError("bad label") from None
  if not 0 <= index < num_classes:
    raise RecordError("label out of range")
  return pts[:, :3].astype(np.float32), index


def _extract(dat: Path, cache: Path, num_classes: int) -> dict[str, Any]:
  """Unpickles the `.dat`, writes one `.npy` per usable item and the index; returns it."""
  with dat.open("rb") as f:
    loaded = pickle.load(f)  # ULIP's format is a pickle
  if not (isinstance(loaded, (list, tuple)) and len(loaded) == 2
          and len(loaded[0]) == len(loaded[1])):
    raise ValueError(f"{dat}: expected a pickle of [points list, labels list] of equal length")
  cache.mkdir(parents=True, exist_ok=True)
  labels: list[int | str] = []  # class index, or why the item is unusable
  for i, (points, label) in enumerate(zip(*loaded)):
    try:
      xyz, index = _item(points, label, num_classes)
    except RecordError as e:
      labels.append(e.reason)
      continue
    np.save(cache / f"{i:05d}.npy", xyz)
    labels.append(index)
  index = {"source": _stamp(dat), "labels": labels}
  tmp = cache / f"{INDEX}.{os.getpid()}.tmp"
  tmp.write_text(json.dumps(index))
  os.replace(tmp, cache / INDEX)  # last: a cache without its index is rebuilt
  return index


def cached_points(dat_path: str | os.PathLike, num_classes: int,
                  cache_dir: str | os.PathLike | None = None) -> tuple[Path, list[int | str]]:
  """The cache folder of a `.dat` (written on first use) and each item's label or reason."""
  dat = Path(dat_path)
  cache = Path(cache_dir) if cache_dir else default_cache_dir(dat)
  try:
    index = json.loads((cache / INDEX).read_text())
    if index["source"] != _stamp(dat):
      raise ValueError("stale")
  except (OSError, ValueError, KeyError):
    index = _extract(dat, cache, num_classes)
  return cache, index["labels"]


def read_modelnet40(dat_path: str | os.PathLike, shape_names_path: str | os.PathLike, *,
                    dataset: str = "modelnet40", shape_ids_path: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None,
                    require_media: bool = False) -> Examples:
  """One classification example per point set: `label` and `answers` hold its class name,
  `meta["classnames"]` the class list, `meta["target"]` the label index. Unusable items
  (not an (N, >=3) array, a label outside the class list) are skipped and counted."""
  names = read_lines(shape_names_path)
  cache, labels = cached_points(dat_path, len(names), cache_dir)
  ids = read_lines(shape_ids_path) if shape_ids_path else ()
  if ids and len(ids) != len(labels):
    ids = ()  # another split's id list: fall back to indices

  def to_example(i, label):
    if isinstance(label, str):
      raise RecordError(label)
    name = names[label]
    return Example(id=ids[i] if ids else str(i), modality="pc",
                   media=str(cache / f"{i:05d}.npy"), task="classification",
                   text_output=name, answers=(name,), label=name, dataset=dataset,
                   meta={"classnames": names, "target": label, "index": i})
  return build(labels, to_example, dataset=dataset, require_media=require_media)
