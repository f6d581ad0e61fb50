"""ModelNet40 reader: ULIP's pickled `.dat` (points list, labels list) + shape names; each
point set becomes a cached `.npy` that the pipeline's point-cloud path normalises."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from xblip_jax.data import pipeline, registry
from xblip_jax.data.formats import modelnet40
from xblip_jax.data.preprocess.pointcloud import pc_norm

NAMES = ("airplane", "flower_pot", "xbox")


def _write(root, n=5, extra=()):
  base = root / "modelnet40_normal_resampled"
  base.mkdir(parents=True)
  (base / modelnet40.SHAPE_NAMES).write_text("\n".join(NAMES) + "\n")
  rng = np.random.default_rng(0)
  points = [rng.normal(size=(64, 6)).astype(np.float32) * (i + 1) for i in range(n)]
  labels = [np.array([i % len(NAMES)], np.int32) for i in range(n)]
  for p, l in extra:
    points.append(p)
    labels.append(l)
  with (base / "modelnet40_test_8192pts_fps.dat").open("wb") as f:
    pickle.dump([points, labels], f)
  (base / "modelnet40_test.txt").write_text(
      "".join(f"{NAMES[i % 3]}_{i:04d}\n" for i in range(len(points))))
  return base, points


def test_reads_points_labels_and_names(tmp_path, monkeypatch):
  monkeypatch.setenv("XBLIP_CACHE_DIR", str(tmp_path / "cache"))
  bad = [(np.zeros((4,), np.float32), np.array([0])),          # not (N, >=3)
         (np.zeros((8, 3), np.float32), np.array([7]))]          # label outside the list
  base, points = _write(tmp_path, extra=bad)
  dat, names = base / "modelnet40_test_8192pts_fps.dat", base / modelnet40.SHAPE_NAMES
  out = modelnet40.read_modelnet40(dat, names, shape_ids_path=base / "modelnet40_test.txt")
  assert len(out) == 5 and out.skipped == {"bad point array": 1, "label out of range": 1}
  for i, ex in enumerate(out):
    assert ex.id == f"{NAMES[i % 3]}_{i:04d}" and ex.modalities == ("pc",)
    assert ex.label == ex.answers[0] == NAMES[i % 3]  # underscores kept, as the reference
    assert ex.meta["classnames"] == NAMES and ex.meta["target"] == i % 3
    np.testing.assert_array_equal(np.load(ex.media), points[i][:, :3])  # normals dropped
    assert ex.media.startswith(str(tmp_path / "cache" / "modelnet40"))  # not in the data
  # The pipeline normalises to the unit sphere and, with exactly `npoints`, shuffles.
  arrays = pipeline.load_media(out[1], np.random.default_rng(0), train=False,
                               opts=pipeline.MediaOptions(npoints=64))
  got, want = arrays["pc"], pc_norm(points[1][:, :3])
  np.testing.assert_allclose(got[np.lexsort(got.T)], want[np.lexsort(want.T)], rtol=1e-6)


def test_cache_is_reused_and_rebuilt_when_the_dat_changes(tmp_path):
  base, points = _write(tmp_path, n=2)
  dat, names = base / "modelnet40_test_8192pts_fps.dat", base / modelnet40.SHAPE_NAMES
  cache = tmp_path / "cache"
  first = modelnet40.read_modelnet40(dat, names, cache_dir=cache)
  os.remove(first[0].media)  # a reused cache is not rewritten
  modelnet40.read_modelnet40(dat, names, cache_dir=cache)
  assert not os.path.exists(first[0].media)
  before = dat.stat().st_mtime_ns
  with dat.open("wb") as f:
    pickle.dump([points[::-1], [np.array([2]), np.array([1])]], f)
  os.utime(dat, ns=(before + 10**9, before + 10**9))  # a newer file, whatever the clock's grain
  second = modelnet40.read_modelnet40(dat, names, cache_dir=cache)
  assert [e.label for e in second] == ["xbox", "flower_pot"]
  np.testing.assert_array_equal(np.load(second[0].media), points[1][:, :3])


def test_not_a_points_and_labels_pickle_is_an_error(tmp_path):
  base, _ = _write(tmp_path, n=1)
  dat = base / "modelnet40_test_8192pts_fps.dat"
  dat.write_bytes(pickle.dumps({"points": []}))
  with pytest.raises(ValueError, match="points list, labels list"):
    modelnet40.read_modelnet40(dat, base / modelnet40.SHAPE_NAMES, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("name,task", [("modelnet40_cls_val", "modelnet40"),
                                       ("modelnet40_completion_val", "modelnet40_gen")])
def test_registered_eval_splits(tmp_path, monkeypatch, name, task):
  monkeypatch.setenv("XBLIP_CACHE_DIR", str(tmp_path / "cache"))
  _write(tmp_path, n=4)
  found = registry.resolve(name, tmp_path, where="data.eval_datasets")
  assert found.entry.eval_task == task
  examples = registry.read(found)
  assert [e.id for e in examples] == [f"{NAMES[i % 3]}_{i:04d}" for i in range(4)]
