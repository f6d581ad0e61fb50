"""BEATs: golden parity, key table, export round trip, clip handling, shapes of the real model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import golden_cases
from xblip_jax.convert import beats_keys
from xblip_jax.convert.mapping import CheckpointKeyError, flat_params, unmapped_params
from xblip_jax.golden import beats as beats_golden
from xblip_jax.golden import load_case
from xblip_jax.models.encoders import beats
from xblip_jax.models.encoders.beats import Beats, BeatsConfig
from xblip_jax.models.layers import Precision


@pytest.mark.parametrize("path", golden_cases("beats"), ids=lambda p: p.stem)
def test_golden(path):
  results = beats_golden.check(load_case(path))
  assert results and all(r.ok for r in results), "\n".join(r.line() for r in results)
  names = {r.name for r in results}
  assert {"features", "features_with_padding_mask", "padding_mask_tokens"} <= names


@pytest.mark.parametrize("path", golden_cases("beats"), ids=lambda p: p.stem)
def test_golden_keys_round_trip(path):
  case = load_case(path)
  model, cfg = beats_golden.build(case)
  exported = beats_keys.export(model, cfg)
  want = {k: v for k, v in case.params.items() if not k.startswith("audio_ln.")}
  assert sorted(exported) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def _random_state_dict(cfg: BeatsConfig, seed: int) -> dict[str, np.ndarray]:
  """Random BEATs-keyed weights for `cfg`, written through the table (no JAX RNG compiles)."""
  abstract = nnx.eval_shape(lambda: Beats(cfg, precision=Precision.float32(), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  ours = {}
  for path, var in flat_params(abstract).items():
    shape = tuple(var.get_value().shape)
    if path.endswith("scale") or path.endswith("weight_g") or path.endswith("grep_a"):
      ours[path] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif len(shape) == 1:
      ours[path] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      fan_in = math.prod(shape[:-1])
      ours[path] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
  sd = {}
  for r in beats_keys.rules(cfg):
    sd.update(zip(r.theirs, r.to_theirs(*(ours[o] for o in r.ours)), strict=True))
  return sd


def _tiny(seed: int = 0, precision: Precision = Precision.float32(),
          **overrides) -> tuple[Beats, BeatsConfig]:
  cfg = BeatsConfig.tiny(**overrides)
  model = beats_keys.from_state_dict(cfg, _random_state_dict(cfg, seed), precision=precision)
  return model, cfg


def test_export_load_round_trip_under_full_model_prefix():
  src, cfg = _tiny(0)
  sd = beats_keys.export(src, cfg, prefix=beats_keys.PREFIX)
  sd["audio_ln.weight"] = np.ones(cfg.encoder_embed_dim, np.float32)  # another module's key
  dst, _ = _tiny(1)
  report = beats_keys.load(dst, cfg, sd, prefix=beats_keys.PREFIX)
  assert report.ok and report.loaded == len(beats_keys.rules(cfg))
  a, b = flat_params(src), flat_params(dst)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()), k)


def test_shared_relative_table_is_checked():
  src, cfg = _tiny(0)
  sd = beats_keys.export(src, cfg)
  key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
  dst, _ = _tiny(1)
  beats_keys.load(dst, cfg, {k: v for k, v in sd.items() if k != key})  # tied copy absent: fine
  sd[key] = sd[key] + 1.0
  with pytest.raises(CheckpointKeyError, match="layers.1"):
    beats_keys.load(dst, cfg, sd)


def test_missing_and_unexpected_keys_are_reported():
  src, cfg = _tiny(0)
  sd = beats_keys.export(src, cfg)
  del sd["encoder.layers.0.fc1.weight"]
  sd["encoder.layers.0.fc3.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointKeyError) as err:
    beats_keys.load(src, cfg, sd)
  assert "encoder.layers.0.fc1.weight" in str(err.value)
  assert "encoder.layers.0.fc3.weight" in str(err.value)


def test_every_param_has_a_rule_and_logical_axes():
  for cfg in (BeatsConfig.tiny(), BeatsConfig.tiny(embed_dim=48, conv_bias=True),
              BeatsConfig.tiny(gru_rel_pos=False, relative_position_embedding=False)):
    model = nnx.eval_shape(lambda: Beats(cfg, precision=Precision.float32(), rngs=nnx.Rngs(0)))
    assert unmapped_params(model, beats_keys.rules(cfg)) == []
    for path, var in flat_params(model).items():
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == len(var.get_value().shape), path


@pytest.mark.slow  # ~20 s of RNG compiles on 2 cores; abstract init is covered above
def test_random_init_runs():
  cfg = BeatsConfig.tiny()
  model = Beats(cfg, precision=Precision.float32(), rngs=nnx.Rngs(0))
  out = _features(model, jnp.ones((1, 32, 128)))
  assert out.shape == (1, 16, 48) and bool(jnp.isfinite(out).all())


def _iter3_checkpoint_shapes(cfg: BeatsConfig) -> dict[str, tuple[int, ...]]:
  """State-dict shapes of BEATs_iter3(+) (torch layout), the tied table listed once."""
  d, e, f, h, k = (cfg.encoder_embed_dim, cfg.embed_dim, cfg.encoder_ffn_embed_dim,
                   cfg.encoder_attention_heads, cfg.conv_pos)
  shapes = {"patch_embedding.weight": (e, 1, 16, 16), "layer_norm.weight": (e,),
            "layer_norm.bias": (e,), "post_extract_proj.weight": (d, e),
            "post_extract_proj.bias": (d,), "encoder.pos_conv.0.weight_g": (1, 1, k),
            "encoder.pos_conv.0.weight_v": (d, d // cfg.conv_pos_groups, k),
            "encoder.pos_conv.0.bias": (d,), "encoder.layer_norm.weight": (d,),
            "encoder.layer_norm.bias": (d,),
            "encoder.layers.0.self_attn.relative_attention_bias.weight": (cfg.num_buckets, h)}
  for i in range(cfg.encoder_layers):
    p = f"encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (d, d), (d,)
    shapes[f"{p}self_attn.grep_linear.weight"] = (8, d // h)
    shapes[f"{p}self_attn.grep_linear.bias"] = (8,)
    shapes[f"{p}self_attn.grep_a"] = (1, h, 1, 1)
    shapes[f"{p}fc1.weight"], shapes[f"{p}fc1.bias"] = (f, d), (f,)
    shapes[f"{p}fc2.weight"], shapes[f"{p}fc2.bias"] = (d, f), (d,)
    for ln in ("self_attn_layer_norm", "final_layer_norm"):
      shapes[f"{p}{ln}.weight"], shapes[f"{p}{ln}.bias"] = (d,), (d,)
  return shapes


def test_iter3_param_count_from_abstract_model():
  cfg = BeatsConfig.beats_iter3()
  model = nnx.eval_shape(lambda: Beats(cfg, precision=Precision.float32(), rngs=nnx.Rngs(0)))
  ours = {k: tuple(v.get_value().shape) for k, v in flat_params(model).items()}
  shapes = _iter3_checkpoint_shapes(cfg)
  count = sum(math.prod(s) for s in ours.values())
  assert count == sum(math.prod(s) for s in shapes.values()) == 90_311_792
  rules = beats_keys.rules(cfg)
  assert sorted(t for r in rules for t in r.theirs) == sorted(shapes)
  for r in rules:  # every tensor maps onto one of ours with the same number of elements
    assert [math.prod(ours[o]) for o in r.ours] == [math.prod(shapes[t]) for t in r.theirs]
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x).features, state,
                       jax.ShapeDtypeStruct((2, 512, 128), jnp.float32))
  assert out.shape == (2, 256, 768)


def test_config_from_lavis_dict():
  case = load_case(golden_cases("beats")[0])
  assert BeatsConfig.from_lavis(case.meta["config"]).input_patch_size == 16
  assert BeatsConfig.from_lavis(
      {"input_patch_size": 16, "embed_dim": 32, "encoder_embed_dim": 48, "encoder_layers": 2,
       "encoder_attention_heads": 4, "encoder_ffn_embed_dim": 96, "conv_pos": 16,
       "conv_pos_groups": 4, "num_buckets": 32, "max_distance": 128, "deep_norm": True,
       "relative_position_embedding": True, "gru_rel_pos": True, "dropout": 0.1}
  ) == BeatsConfig.tiny()
  # Absent keys take LAVIS' BEATsConfig defaults, not the iter3 ones.
  plain = BeatsConfig.from_lavis({"input_patch_size": 16})
  assert (plain.deep_norm, plain.relative_position_embedding, plain.max_distance) == (
      False, False, 1280)
  with pytest.raises(ValueError):
    BeatsConfig.from_lavis({"input_patch_size": 16, "finetuned_model": True})


def test_relative_buckets_have_no_float32_edge_effects():
  # A bucket edge landing within float32 rounding of an integer would make the
  # result depend on the log implementation; check the configs in use.
  for num_buckets, max_distance, n in ((320, 800, 512), (32, 128, 64)):
    got = beats.relative_position_buckets(n, num_buckets, max_distance)
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    half, dist = num_buckets // 2, np.abs(rel)
    exact = half // 2
    large = exact + np.floor(np.log(np.maximum(dist, 1) / exact) / np.log(max_distance / exact)
                             * (half - exact) + 1e-9).astype(int)
    want = (rel > 0) * half + np.where(dist < exact, dist, np.minimum(large, half - 1))
    np.testing.assert_array_equal(got, want)


def test_padding_mask_reduction():
  frames = jnp.zeros((1, 70), bool).at[0, 60:].set(True)
  # 70 % 32 = 6 trailing frames dropped, then pairs of frames -> tokens.
  tokens = beats.reduce_padding_mask(frames, 32)
  assert np.flatnonzero(np.asarray(tokens[0])).tolist() == [30, 31]
  assert bool(beats.reduce_padding_mask(jnp.zeros((2, 20), bool), 32).all())  # T < N: all True


# Shared jitted entry points: tests that run the same model shapes reuse one compile.
_features = nnx.jit(lambda m, x: m(x).features)


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_encode_clips_is_per_clip_extract_features():
  model, _ = _tiny(0, encoder_layers=1)
  clips = _normal(0, (2, 3, 32, 128))
  got = nnx.jit(lambda m, x: m.encode_clips(x))(model, clips)
  assert got.shape == (2, 3, 16, 48)
  for c in range(3):
    np.testing.assert_allclose(got[:, c], _features(model, clips[:, c]), atol=1e-5, rtol=1e-5)


def test_time_major_tokens():
  model, _ = _tiny(0)
  fbank = jnp.zeros((1, 32, 128)).at[0, 16:, 0:16].set(1.0)  # time patch 1, freq patch 0
  patches = np.asarray(nnx.jit(lambda m, x: m.patch_features(x))(model, fbank))[0]
  changed = np.flatnonzero(np.abs(patches - patches[0]).max(-1) > 1e-6)
  assert changed.tolist() == [8]


def test_bf16_runs_and_is_close():
  f32, _ = _tiny(0, encoder_layers=1)
  bf16, _ = _tiny(0, precision=Precision.bf16_compute(), encoder_layers=1)
  x = _normal(1, (2, 32, 128))
  a, b = _features(f32, x), _features(bf16, x)
  assert b.dtype == jnp.bfloat16 and bool(jnp.isfinite(b).all())
  assert float(jnp.abs(a - b.astype(jnp.float32)).max()) < 0.25
