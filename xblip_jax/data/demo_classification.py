"""The demo's classification sets, in ESC-50's and ULIP's ModelNet40 layouts.

The demo answers questions about beeps (pitch x speed) and 3D shapes; these two sets ask the
same model to classify them the way the paper evaluates ESC-50 and ModelNet40: by ranking
every class name as a continuation of the prompt (`eval/candidate_nll.py`). They are written
by the same media generators as the rest of the demo (`demo_media.py`), so a model trained on
the demo's captions can be scored on them without training on them:
- `audio_cls`: `meta/esc50_{split}.csv` + `audio/*.wav` (44.1 kHz mono), classes
  "fast high beeps", "slow low beeps", ... (categories written with `_`, as ESC-50's are);
- `pc_cls`: `modelnet40_{split}_8192pts_fps.dat` (a pickle of 8192 x 6 point sets, xyz and
  zero normals, and length-1 label arrays) + `modelnet40_shape_names.txt` (the demo's 3D
  shapes). Its manifest entry's `media_root` is the shape-names file (the reader's second
  argument): the points are inside the `.dat`.
Each writer has the signature of `demo.write_demo_data`'s family writers. `demo` is used as a
module (attributes read at call time), so `demo.py` may import this module at its top.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from xblip_jax.data import demo as demo_lib
from xblip_jax.data import demo_media as dm
from xblip_jax.data.formats import modelnet40

AUDIO_SET, PC_SET = "audio_cls", "pc_cls"
ESC50_HEADER = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
# Word order as the demo captions say it ("a series of fast high beeps").
AUDIO_CLASSES = tuple((p, s) for s in dm.SPEEDS for p in dm.PITCHES)


def audio_category(pitch: str, speed: str) -> str:
  return f"{speed}_{pitch}_beeps"


def esc50_split(root: Path, split: str, n: int, rng: np.random.Generator,
                manifest: demo_lib.Manifest) -> None:
  """`n` beep clips, classes in turn (shuffled), so that with `n` >= 4 every class is in the
  CSV (the class list is read from it); ESC-50 names `{fold}-{src}-{take}-{target}.wav`."""
  base = root / "esc50"
  rows = []
  for k, target in enumerate(rng.permutation(np.arange(n) % len(AUDIO_CLASSES))):
    pitch, speed = AUDIO_CLASSES[target]
    fold, src = k % 5 + 1, f"{split}{k:04d}"
    name = f"{fold}-{src}-A-{target}.wav"
    dm.write_beeps(base / "audio" / name, pitch, speed, 44100, rng)
    rows.append((name, fold, int(target), audio_category(pitch, speed), False, src, "A"))
  manifest.setdefault(AUDIO_SET, {})[split] = demo_lib.DemoDataset(
      AUDIO_SET, split, "esc50",
      demo_lib._write_csv(base / "meta" / f"esc50_{split}.csv", ESC50_HEADER, rows),
      str(base / "audio"))


def _points(shape: str, rng: np.random.Generator) -> np.ndarray:
  """(8192, 6) float32: surface points of `shape`, scaled and moved, then zero normals."""
  xyz = dm.surface_points(shape, dm.NUM_POINTS, rng) * rng.uniform(0.5, 2.0)
  xyz = xyz + rng.uniform(-1, 1, size=3)
  return np.concatenate([xyz, np.zeros_like(xyz)], axis=1).astype(np.float32)


def modelnet40_split(root: Path, split: str, n: int, rng: np.random.Generator,
                     manifest: demo_lib.Manifest) -> None:
  """`n` point sets of random demo shapes in ULIP's pickled ModelNet40 format."""
  base = root / "modelnet40" / "modelnet40_normal_resampled"
  base.mkdir(parents=True, exist_ok=True)
  names = base / modelnet40.SHAPE_NAMES
  names.write_text("".join(f"{s}\n" for s in dm.SHAPES_3D))
  labels = [int(rng.integers(len(dm.SHAPES_3D))) for _ in range(n)]
  points = [_points(dm.SHAPES_3D[k], rng) for k in labels]
  dat = base / f"modelnet40_{split}_8192pts_fps.dat"
  with dat.open("wb") as f:
    pickle.dump([points, [np.array([k], np.int32) for k in labels]], f)
  manifest.setdefault(PC_SET, {})[split] = demo_lib.DemoDataset(
      PC_SET, split, "modelnet40", str(dat), str(names))
