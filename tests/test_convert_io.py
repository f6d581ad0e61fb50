"""Checkpoint file I/O of the converters: safetensors/torch readers and writers, truncated and
foreign files failing with named errors, the dtype policy."""

from __future__ import annotations

import fractions
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from xblip_jax.convert import cli
from xblip_jax.convert.engine import cast
from xblip_jax.convert.io import (CheckpointFileError, numpy_to_torch, open_source, parse_size,
                                  shard_items, torch_to_numpy, write_safetensors)


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  return {"a.weight": rng.normal(size=(3, 5)).astype(np.float32),
          "b.bias": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
          "c.half": rng.normal(size=(2, 2, 2)).astype(np.float16),
          "d.ids": np.arange(4, dtype=np.int64)}


def test_safetensors_writer_is_read_by_the_reference_library_and_back(tmp_path):
  arrays = _arrays()
  write_safetensors(tmp_path / "one", [arrays])
  got = load_file(tmp_path / "one" / "model.safetensors")
  for k, v in arrays.items():
    if v.dtype != ml_dtypes.bfloat16:  # safetensors.numpy has no bfloat16
      np.testing.assert_array_equal(got[k], v)
  paths = write_safetensors(tmp_path / "many", shard_items(arrays.items(), 40))
  assert len(paths) > 1
  index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(arrays)
  src = open_source(tmp_path / "many")
  for k, v in arrays.items():
    assert src.shape(k) == v.shape and src.dtype(k) == v.dtype
    np.testing.assert_array_equal(src.read(k), v)


def test_reader_accepts_files_of_the_reference_library(tmp_path):
  arrays = {k: v for k, v in _arrays(1).items() if v.dtype != ml_dtypes.bfloat16}
  save_file(arrays, tmp_path / "x.safetensors")
  src = open_source(tmp_path / "x.safetensors")
  for k, v in arrays.items():
    np.testing.assert_array_equal(src.read(k), v)


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
  write_safetensors(tmp_path / "m", [_arrays()])
  path = tmp_path / "m" / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:-10])
  with pytest.raises(CheckpointFileError, match=r"model\.safetensors: truncated: tensor \S+ needs"):
    open_source(tmp_path / "m")
  path.write_bytes(data[:5])
  with pytest.raises(CheckpointFileError, match="truncated safetensors file"):
    open_source(path)


def test_truncated_or_foreign_torch_files(tmp_path):
  sd = {k: numpy_to_torch(v) for k, v in _arrays().items()}
  torch.save({"model": sd}, tmp_path / "ok.pth")
  src = open_source(tmp_path / "ok.pth")  # the `model` entry is found
  np.testing.assert_array_equal(src.read("b.bias"), _arrays()["b.bias"])
  data = (tmp_path / "ok.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointFileError, match=r"cut\.pth: cannot read as a PyTorch checkpoint"):
    open_source(tmp_path / "cut.pth")

  # An object that weights_only=True refuses to unpickle.
  torch.save({"model": sd, "extra": fractions.Fraction(1, 3)}, tmp_path / "pickle.pth")
  with pytest.raises(CheckpointFileError, match="--trust-pickle"):
    open_source(tmp_path / "pickle.pth")


def test_truncated_shard_fails_before_anything_is_written(tmp_path):
  arrays = {f"model.layers.{i}.w": np.ones((4, 4), np.float32) for i in range(3)}
  write_safetensors(tmp_path / "hf", shard_items(arrays.items(), 64))
  (tmp_path / "hf" / "config.json").write_text("{}")
  shard = tmp_path / "hf" / "model-00002-of-00003.safetensors"
  shard.write_bytes(shard.read_bytes()[:-1])
  with pytest.raises(CheckpointFileError, match="model-00002-of-00003.safetensors: truncated"):
    cli.run(["import", "hf-llama", str(tmp_path / "hf"), "--out", str(tmp_path / "out")],
            log=lambda _: None)
  assert not (tmp_path / "out").exists()


def test_torch_numpy_bfloat16_round_trip_and_dtype_policy():
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(ml_dtypes.bfloat16)
  t = numpy_to_torch(x)
  assert t.dtype == torch.bfloat16
  np.testing.assert_array_equal(torch_to_numpy(t), x)
  f32 = np.ones(2, np.float32)
  assert cast(f32, "keep", np.dtype(np.float16)).dtype == np.float16
  assert cast(f32, "bfloat16", f32.dtype).dtype == ml_dtypes.bfloat16
  assert cast(np.arange(3), "float16", np.dtype(np.int64)).dtype == np.int64  # ints untouched
  with pytest.raises(ValueError, match="dtype policy"):
    cast(f32, "fp8", f32.dtype)
  assert parse_size("5GB") == 5 * 10**9 and parse_size("20KB") == 20_000
