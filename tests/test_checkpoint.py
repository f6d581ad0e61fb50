"""`init_from`: trainable parameters from another checkpoint, partial trees reported by name;
pretrained frozen towers restored into their shards; mesh sizes, rule sets, even shardings."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from flax import nnx

from xblip_jax import sharding
from xblip_jax.models.layers import Precision, dense
from xblip_jax.train import checkpoint, model_init

sys.path.insert(0, str(REPO / "configs"))
import demo as demo_config  # noqa: E402  pylint: disable=wrong-import-position


class _Bridge(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.proj = dense(8, 16, ("embed", "heads"), precision=Precision(), rngs=rngs)
    self.head = dense(16, 4, ("heads", "embed"), precision=Precision(), rngs=rngs)


def test_init_from_loads_common_keys_and_names_the_rest(tmp_path):
  source = nnx.state(_Bridge(nnx.Rngs(1)), nnx.Param)
  partial = {"proj": {"kernel": np.asarray(source["proj"]["kernel"][...]),
                      "bias": np.asarray(source["proj"]["bias"][...])},
             "extra": {"w": np.ones((3,), np.float32)}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "params", partial)
  target = nnx.state(_Bridge(nnx.Rngs(2)), nnx.Param)
  mesh = sharding.make_mesh({"fsdp": -1})
  shardings = sharding.named_shardings(target, mesh)
  loaded, missing, unexpected = checkpoint.init_params(str(tmp_path / "params"), target,
                                                       shardings)
  assert missing == ["head/bias", "head/kernel"]
  assert unexpected == ["extra/w"]
  merged = nnx.merge_state(target, loaded)
  np.testing.assert_array_equal(merged["proj"]["kernel"][...], partial["proj"]["kernel"])
  np.testing.assert_array_equal(merged["head"]["kernel"][...], target["head"]["kernel"][...])


def test_init_from_rejects_mis_shaped_tensors(tmp_path):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "params", {"proj": {"kernel": np.zeros((2, 2), np.float32)}})
  target = nnx.state(_Bridge(nnx.Rngs(0)), nnx.Param)
  shardings = sharding.named_shardings(target, sharding.make_mesh({"fsdp": -1}))
  with pytest.raises(ValueError, match="proj/kernel"):
    checkpoint.init_params(str(tmp_path / "params"), target, shardings)


def test_mesh_sizes_fill_and_check():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 16) == (2, 4, 2)
  assert sharding.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="divide"):
    sharding.mesh_shape({"tensor": 3, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"model": 2}, 8)


def test_specs_stay_even_and_rule_sets_differ():
  mesh_shape = {"data": 1, "fsdp": 8, "tensor": 2}
  spec = sharding.logical_to_spec(("vocab", "embed"), shape=(32001, 4096), mesh_shape=mesh_shape)
  assert spec == sharding.PartitionSpec(None, "fsdp")  # 32001 rows do not split over tensor
  spec = sharding.logical_to_spec(("embed", "mlp"), sharding.rules("fsdp"), shape=(768, 3072),
                                  mesh_shape=mesh_shape)
  assert spec == sharding.PartitionSpec("fsdp", None)
  spec = sharding.logical_to_spec(("embed", "mlp"), sharding.rules("replicated"),
                                  shape=(768, 3072), mesh_shape=mesh_shape)
  assert spec == sharding.PartitionSpec(None, None)
  with pytest.raises(ValueError, match="rule set"):
    sharding.rules("zero3")


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((4, 3))
  assert sharding.constrain(x, ("batch", "embed")) is x
  assert jax.jit(lambda y: sharding.constrain(y, ("batch", None)))(x).shape == (4, 3)


def test_pretrained_towers_load_into_their_shards(tmp_path):
  config = demo_config.get_config()
  mesh = sharding.make_mesh({"fsdp": -1})
  source = model_init.create_sharded(config, ("image",), 384, mesh).merge()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "eva", nnx.state(source.encoders["image"]))
    ckptr.save(tmp_path / "llm", nnx.state(source.llm))
  config.seed = 1
  other = model_init.create_sharded(config, ("image",), 384, mesh)
  loaded = model_init.create_sharded(config, ("image",), 384, mesh, weights={
      ("encoders", "image"): tmp_path / "eva", ("llm",): tmp_path / "llm"})
  for key in ("encoders", "llm"):
    want = jax.tree.leaves(nnx.state(getattr(source, key)))
    got = jax.tree.leaves(loaded.rest[key])
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Trainable parameters still come from the seed; the frozen towers from the files.
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  assert diff(loaded.params, other.params) == 0.0
  assert diff(loaded.rest["llm"], other.rest["llm"]) > 0.0
