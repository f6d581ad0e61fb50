"""ULIP-2 PointBERT: golden parity, FPS/kNN against float64 NumPy, key mapping, input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import golden_cases
from flax import nnx

from xblip_jax.convert import pointbert_keys
from xblip_jax.convert.mapping import (CheckpointKeyError, export_state_dict, flat_params,
                                       load_state_dict, unmapped_params)
from xblip_jax.golden import load_case
from xblip_jax.golden import pointbert as golden_pointbert
from xblip_jax.models import layers
from xblip_jax.models.encoders import point_grouping
from xblip_jax.models.encoders.pointbert import (PointBert, PointBertConfig, validate_points)

LOGICAL_AXES = {"batch", "seq", "embed", "mlp", "heads", "kv", "vocab", "queries", "enc_embed",
                "layers", "conv_in", "conv_out", "kernel", "norm", None}


def abstract_model(cfg: PointBertConfig) -> PointBert:
  return nnx.eval_shape(lambda: PointBert(cfg, precision=layers.Precision.float32(),
                                          rngs=nnx.Rngs(0)))


# --- golden parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", golden_cases("pointbert"), ids=lambda p: p.stem)
def test_golden_parity(path):
  case = load_case(path)
  comparisons = golden_pointbert.check(case)
  names = {c.name for c in comparisons}
  for required in ("fps_center_indices", "knn_indices", "pc_embed", "pc_embeds_ln_qformer_input"):
    assert required in names, f"{required} not compared"
  failed = [c.line() for c in comparisons if not c.ok]
  assert not failed, "\n".join(failed)


def test_golden_config_is_tiny_preset():
  case = load_case(golden_cases("pointbert")[0])
  if case.name == "pointbert_a":
    assert golden_pointbert.config_from_case(case) == PointBertConfig.tiny()


# --- FPS / kNN against a plain float64 implementation -------------------------------------------

def numpy_fps(xyz: np.ndarray, num: int) -> np.ndarray:
  xyz = xyz.astype(np.float64)
  nearest = np.full(len(xyz), 1e10)
  chosen, current = [], 0
  for _ in range(num):
    chosen.append(current)
    nearest = np.minimum(nearest, ((xyz - xyz[current]) ** 2).sum(-1))
    current = int(np.argmax(nearest))
  return np.array(chosen)


def numpy_knn(xyz: np.ndarray, centers: np.ndarray, k: int) -> np.ndarray:
  d = ((centers[:, None].astype(np.float64) - xyz[None].astype(np.float64)) ** 2).sum(-1)
  return np.argsort(d, axis=-1, kind="stable")[:, :k]


def random_clouds(seed: int, batch: int, n: int, kind: str) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if kind == "normed":  # like ULIPPCProcessor.pc_norm: centred, inside the unit sphere
    x = rng.normal(size=(batch, n, 3)) * rng.uniform(0.2, 2.0, size=(batch, 1, 3))
    x = x - x.mean(1, keepdims=True)
    x = x / np.linalg.norm(x, axis=-1).max(1)[:, None, None]
  elif kind == "duplicates":  # mesh vertices repeated to fill the cloud (the LAVIS demo)
    base = rng.uniform(-1, 1, size=(batch, n // 3 + 1, 3))
    x = np.concatenate([base] * 3, axis=1)[:, :n]
  elif kind == "grid":  # dyadic coordinates: many exactly tied distances
    x = rng.integers(-8, 9, size=(batch, n, 3)) / 8.0
  else:
    x = rng.uniform(-1, 1, size=(batch, n, 3))
  return x.astype(np.float32)


_group = jax.jit(point_grouping.group_points, static_argnums=(1, 2))


@pytest.mark.parametrize("batch,n,g,m", [(2, 300, 24, 12), (3, 1024, 64, 32)])
@pytest.mark.parametrize("kind", ["normed", "uniform", "duplicates", "grid"])
def test_grouping_matches_float64(batch, n, g, m, kind):
  for seed in range(3):
    xyz = random_clouds(1000 * seed + n, batch, n, kind)
    center_idx, knn_idx, centers, neighborhood = map(np.asarray, _group(jnp.asarray(xyz), g, m))
    for b in range(batch):
      want_centers = numpy_fps(xyz[b], g)
      np.testing.assert_array_equal(center_idx[b], want_centers, err_msg=f"fps {kind} seed {seed}")
      want_knn = numpy_knn(xyz[b], xyz[b][want_centers], m)
      np.testing.assert_array_equal(knn_idx[b], want_knn, err_msg=f"knn {kind} seed {seed}")
      np.testing.assert_array_equal(centers[b], xyz[b][want_centers])
      np.testing.assert_array_equal(neighborhood[b],
                                    xyz[b][want_knn] - xyz[b][want_centers][:, None])
    assert center_idx.dtype == knn_idx.dtype == np.int32
    assert np.all(center_idx[:, 0] == 0)
    d = ((xyz[np.arange(batch)[:, None, None], knn_idx] - centers[:, :, None]) ** 2).sum(-1)
    assert np.all(np.diff(d, axis=-1) >= 0), "neighbours must come nearest first"


def test_grouping_rejects_too_few_points():
  with pytest.raises(ValueError, match="centres"):
    point_grouping.farthest_point_sample(jnp.zeros((1, 4, 3)), 5)
  with pytest.raises(ValueError, match="neighbours"):
    point_grouping.knn_indices(jnp.zeros((1, 4, 3)), jnp.zeros((1, 2, 3)), 5)


# --- input validation ---------------------------------------------------------------------------

def test_validate_points_names_the_bad_sample():
  xyz = random_clouds(0, 3, 64, "normed")
  validate_points(xyz, ["a", "b", "c"])
  validate_points(xyz[0], "a")
  validate_points(xyz)
  bad = xyz.copy()
  bad[1, 7, 2] = np.nan
  with pytest.raises(ValueError, match=r"sample 'shape_b'.*1 NaN, 0 inf; first bad point index 7"):
    validate_points(bad, ["shape_a", "shape_b", "shape_c"])
  bad[1, 7, 2] = np.inf
  with pytest.raises(ValueError, match=r"sample 3 .*0 NaN, 1 inf"):
    validate_points(np.concatenate([xyz, bad[1:2]]))
  with pytest.raises(ValueError, match=r"sample 'only'"):
    validate_points(bad[1], "only")
  with pytest.raises(ValueError, match="xyz only"):
    validate_points(np.zeros((64, 6), np.float32), "rgb")
  with pytest.raises(ValueError, match="sample ids"):
    validate_points(xyz, ["a"])


def test_model_rejects_colour_channels():
  model = abstract_model(PointBertConfig.tiny())
  with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
    model(jnp.zeros((1, 256, 6)))


# --- key mapping, parameter count, logical axes -------------------------------------------------

def lavis_shapes(cfg: PointBertConfig) -> dict[str, tuple[int, ...]]:
  """Every `point_encoder.*` / `pc_projection` key and its PyTorch shape, as LAVIS builds them."""
  d, c, mlp = cfg.trans_dim, cfg.encoder_dims, cfg.mlp_dim
  (h1, h2), h3 = cfg.first_conv_dims, cfg.second_conv_hidden
  shapes: dict[str, tuple[int, ...]] = {"pc_projection": (cfg.pc_feat_dim, cfg.embed_dim)}
  p = "point_encoder."
  for name, (o, i) in {"first_conv.0": (h1, 3), "first_conv.3": (h2, h1),
                       "second_conv.0": (h3, 2 * h2), "second_conv.3": (c, h3)}.items():
    shapes |= {f"{p}encoder.{name}.weight": (o, i, 1), f"{p}encoder.{name}.bias": (o,)}
  for name, f in {"first_conv.1": h1, "second_conv.1": h3}.items():
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{p}encoder.{name}.{leaf}"] = (f,)
  linears = {"reduce_dim": (d, c), "pos_embed.0": (cfg.pos_hidden, 3),
             "pos_embed.2": (d, cfg.pos_hidden)}
  for i in range(cfg.depth):
    b = f"blocks.blocks.{i}."
    linears |= {b + "attn.proj": (d, d), b + "mlp.fc1": (mlp, d), b + "mlp.fc2": (d, mlp)}
    shapes[f"{p}{b}attn.qkv.weight"] = (3 * d, d)
    for n in ("norm1", "norm2"):
      shapes |= {f"{p}{b}{n}.weight": (d,), f"{p}{b}{n}.bias": (d,)}
  for name, (o, i) in linears.items():
    shapes |= {f"{p}{name}.weight": (o, i), f"{p}{name}.bias": (o,)}
  shapes |= {f"{p}cls_token": (1, 1, d), f"{p}cls_pos": (1, 1, d), f"{p}norm.weight": (d,),
             f"{p}norm.bias": (d,)}
  return shapes


def test_real_preset_param_count_and_keys():
  cfg = PointBertConfig.ulip2_pointbert()
  model = abstract_model(cfg)
  shapes = lavis_shapes(cfg)
  stats = {k for k in shapes if "running_" in k}
  count = lambda kind: sum(int(np.prod(v.shape))
                           for _, v in nnx.to_flat_state(nnx.state(model, kind)))
  assert count(nnx.Param) == sum(int(np.prod(s)) for k, s in shapes.items() if k not in stats)
  assert count(nnx.BatchStat) == sum(int(np.prod(shapes[k])) for k in stats)
  assert count(nnx.Param) == 22_252_032 and count(nnx.BatchStat) == 1_280
  # The full X-InstructBLIP key set (prefix, num_batches_tracked) loads with nothing left over.
  sd = {pointbert_keys.PREFIX + k: np.zeros(s, np.float32) for k, s in shapes.items()}
  sd |= {f"{pointbert_keys.PREFIX}point_encoder.encoder.{n}.1.num_batches_tracked":
         np.zeros((), np.int64) for n in ("first_conv", "second_conv")}
  report = load_state_dict(model, pointbert_keys.rules(cfg), sd, prefix=pointbert_keys.PREFIX,
                           ignore=pointbert_keys.IGNORE)
  assert report.ok and report.loaded == len(shapes)


def test_rules_cover_every_variable_and_axes_are_named():
  cfg = PointBertConfig.tiny()
  model = abstract_model(cfg)
  rules = pointbert_keys.rules(cfg)
  assert unmapped_params(model, rules) == []
  covered = {p for r in rules for p in r.ours}
  assert covered == set(flat_params(model)), "every Param and BatchStat needs a rule"
  for path, var in flat_params(model).items():
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.get_value().shape), path
    assert set(axes) <= LOGICAL_AXES, (path, axes)
  assert all(isinstance(flat_params(model)[f"encoder.bn1.{n}"], nnx.BatchStat)
             for n in ("mean", "var"))


def test_export_round_trip_and_strict_load():
  case = load_case(golden_cases("pointbert")[0])
  cfg = golden_pointbert.config_from_case(case)
  model, _ = golden_pointbert.build(case)
  exported = export_state_dict(model, pointbert_keys.rules(cfg))
  tower = {k: v for k, v in case.params.items()
           if not k.startswith("pc_ln.") and not k.endswith("num_batches_tracked")}
  assert set(exported) == set(tower)
  for k, v in tower.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  again = abstract_model(cfg)
  load_state_dict(again, pointbert_keys.rules(cfg), exported)
  for path, var in flat_params(model).items():
    np.testing.assert_array_equal(flat_params(again)[path].get_value(), var.get_value())
  broken = dict(tower)
  broken.pop("point_encoder.encoder.second_conv.1.running_var")
  broken["point_encoder.reduce_dim.weight"] = broken["point_encoder.reduce_dim.weight"].T
  with pytest.raises(CheckpointKeyError, match="running_var(.|\n)*reduce_dim.weight"):
    load_state_dict(abstract_model(cfg), pointbert_keys.rules(cfg), broken)
