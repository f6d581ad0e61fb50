"""EVA ViT: LAVIS golden parity, `Blip2VisionModel` parity, video path, pos-embed resampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import golden_cases
from xblip_jax.convert import mapping
from xblip_jax.convert.eva_vit_keys import eva_vit_ignore, hf_rules, lavis_rules
from xblip_jax.golden import eva_vit as golden_eva
from xblip_jax.golden import load_case
from xblip_jax.models.encoders import eva_vit
from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig, interpolate_pos_embed
from xblip_jax.models.layers import LayerNorm, Precision

CASES = golden_cases("eva_vit")


def _abstract(cfg: EvaViTConfig) -> EvaViT:
  """A model without initialised weights; a strict load fills every parameter."""
  return nnx.eval_shape(lambda: EvaViT(cfg, precision=Precision.float32(), rngs=nnx.Rngs(0)))


def _loaded(cfg: EvaViTConfig, rules, state_dict, **kw) -> EvaViT:
  model = _abstract(cfg)
  mapping.load_state_dict(model, rules, state_dict, **kw)
  return model


@nnx.jit
def _forward(model: EvaViT, pixels):
  return model(pixels)


@nnx.jit
def _video(model: EvaViT, pixels):
  return model.encode_video(pixels)


@pytest.fixture(scope="module")
def case_a():
  return load_case(CASES[0])


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden(path):
  comparisons = golden_eva.check(load_case(path))
  assert {"features", "features_ln"} <= {c.name for c in comparisons}
  assert all(c.ok for c in comparisons), "\n".join(c.line() for c in comparisons)


def test_rules_cover_every_param_and_round_trip(case_a):
  cfg, _ = golden_eva.config_from_meta(case_a.meta)
  model = _abstract(cfg)
  assert mapping.unmapped_params(model, lavis_rules(cfg)) == []
  assert mapping.unmapped_params(model, hf_rules(cfg)) == []
  model = _loaded(cfg, lavis_rules(cfg), case_a.params, ignore=[r"ln_vision\..*"])
  exported = mapping.export_state_dict(model, lavis_rules(cfg))
  vit_keys = {k for k in case_a.params if not k.startswith("ln_vision.")}
  assert set(exported) == vit_keys
  for k in vit_keys:
    np.testing.assert_array_equal(exported[k], case_a.params[k], err_msg=k)
  # LAVIS -> ours -> HF -> ours is lossless too.
  hf = mapping.export_state_dict(model, hf_rules(cfg))
  again = mapping.export_state_dict(_loaded(cfg, hf_rules(cfg), hf), lavis_rules(cfg))
  for k in vit_keys:
    np.testing.assert_array_equal(again[k], case_a.params[k], err_msg=k)


def test_extra_checkpoint_blocks_are_ignored(case_a):
  # eva_vit_g.pth has 40 blocks; the model keeps 39. Here: a 2-block case into a 1-block model.
  cfg, _ = golden_eva.config_from_meta(case_a.meta)
  cfg1 = dataclasses.replace(cfg, depth=1)
  ignore = eva_vit_ignore(cfg1) + [r"ln_vision\..*"]
  model = _loaded(cfg1, lavis_rules(cfg1), case_a.params, ignore=ignore)
  np.testing.assert_array_equal(model.blocks[0].attn.q_bias[...],
                                case_a.params["blocks.0.attn.q_bias"])
  with pytest.raises(mapping.CheckpointKeyError, match="blocks.1.attn.q_bias"):
    _loaded(cfg1, lavis_rules(cfg1), case_a.params, ignore=[r"ln_vision\..*"])


def test_logical_axes_on_every_param(case_a):
  cfg, _ = golden_eva.config_from_meta(case_a.meta)
  for path, var in nnx.to_flat_state(nnx.state(_abstract(cfg), nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.get_value().shape), path
  conv = _abstract(cfg).patch_embed.kernel.get_metadata()["out_sharding"]
  assert tuple(conv) == ("kernel", "kernel", "conv_in", "embed")


def _randomise(model, seed: int) -> None:
  """Weights far from their defaults, as the golden cases (so a wrong mapping shows)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("weight") and p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:  # class / position embeddings
        p.copy_(torch.randn(p.shape, generator=g))


def test_matches_transformers_blip2_vision_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  # Shapes unlike the golden case's: head dim 8, 7px patches, 3 blocks.
  cfg = EvaViTConfig.tiny(img_size=28, patch_size=7, width=40, depth=3, num_heads=5)
  hf_cfg = transformers.Blip2VisionConfig(
      hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.num_heads, image_size=cfg.img_size, patch_size=cfg.patch_size,
      layer_norm_eps=cfg.layer_norm_eps, qkv_bias=True, hidden_act="gelu", attention_dropout=0.0)
  hf = transformers.Blip2VisionModel(hf_cfg).eval()
  _randomise(hf, seed=7)
  hf.post_layernorm.eps = 1e-5  # as LAVIS ln_vision / X-InstructBLIP image_ln
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  # A key bias only shifts each score row by a constant, which softmax removes: the non-zero
  # random one must not matter.
  assert np.abs(sd["encoder.layers.0.self_attn.qkv.bias"][cfg.width:2 * cfg.width]).max() > 0

  model = _loaded(cfg, hf_rules(cfg), sd, ignore=[r"post_layernorm\..*"])
  ln = nnx.eval_shape(lambda: LayerNorm(cfg.width, eps=1e-5))
  mapping.load_state_dict(ln, [mapping.copy("scale", "weight"), mapping.copy("bias", "bias")],
                          sd, prefix="post_layernorm.", strict_unexpected=False)

  pixels = np.random.default_rng(0).normal(size=(2, 3, cfg.img_size, cfg.img_size))
  pixels = pixels.astype(np.float32)
  with torch.no_grad():
    out = hf(torch.from_numpy(pixels), output_hidden_states=True)
  ours = _forward(model, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(ours, out.hidden_states[-1].numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ln(ours), out.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)

  exported = mapping.export_state_dict(model, hf_rules(cfg))
  assert set(exported) == {k for k in sd if not k.startswith("post_layernorm.")}
  for k, v in exported.items():
    want = sd[k].copy()
    if k.endswith("qkv.bias"):
      want[cfg.width:2 * cfg.width] = 0
    np.testing.assert_array_equal(v, want, err_msg=k)


def test_video_equals_per_frame_calls(case_a):
  cfg, _ = golden_eva.config_from_meta(case_a.meta)
  model = _loaded(cfg, lavis_rules(cfg), case_a.params, ignore=[r"ln_vision\..*"])
  b, t = 2, 3
  frames = jax.random.normal(jax.random.key(1), (b, t, cfg.img_size, cfg.img_size, 3))
  video = _video(model, frames)
  assert video.shape == (b, t, cfg.num_tokens, cfg.width)
  per_frame = jnp.stack([_forward(model, frames[:, j]) for j in range(t)], axis=1)
  np.testing.assert_allclose(video, per_frame, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("old,new", [(4, 6), (6, 4), (4, (3, 5)), (1, 3)])
def test_pos_embed_resampling_matches_torch_bicubic(old, new):
  torch = pytest.importorskip("torch")
  h, w = (new, new) if isinstance(new, int) else new
  pos = np.random.default_rng(0).normal(size=(1, 1 + old * old, 5)).astype(np.float32)
  grid = torch.from_numpy(pos[0, 1:].reshape(1, old, old, 5)).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
  want = np.concatenate([pos[0, :1], want.permute(0, 2, 3, 1).reshape(h * w, 5).numpy()])
  got_np = interpolate_pos_embed(pos, new)
  assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
  np.testing.assert_allclose(got_np[0], want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(interpolate_pos_embed(jnp.asarray(pos[0]), new), want,
                             atol=1e-5, rtol=1e-5)


def test_pos_embed_same_grid_is_identity():
  pos = np.random.default_rng(1).normal(size=(1, 17, 8)).astype(np.float32)
  assert interpolate_pos_embed(pos, 4) is pos
  assert interpolate_pos_embed(pos, (4, 4)) is pos
  with pytest.raises(ValueError):
    interpolate_pos_embed(pos[:, :-1], 4)


def test_checkpoint_of_another_size_loads_and_runs(case_a):
  cfg32, _ = golden_eva.config_from_meta(case_a.meta)
  cfg48 = dataclasses.replace(cfg32, img_size=cfg32.img_size * 3 // 2)
  model48 = _loaded(cfg48, lavis_rules(cfg48), case_a.params, ignore=[r"ln_vision\..*"])
  np.testing.assert_allclose(
      model48.pos_embed[...], interpolate_pos_embed(case_a.params["pos_embed"][0], cfg48.grid),
      atol=1e-6)
  pixels = jax.random.normal(jax.random.key(2), (1, cfg48.img_size, cfg48.img_size, 3))
  out48 = _forward(model48, pixels)
  assert out48.shape == (1, cfg48.num_tokens, cfg48.width)
  assert np.isfinite(np.asarray(out48)).all()
  # The 32px model resamples its own table on the fly for a 48px input: same numbers.
  model32 = _loaded(cfg32, lavis_rules(cfg32), case_a.params, ignore=[r"ln_vision\..*"])
  np.testing.assert_allclose(_forward(model32, pixels), out48, atol=1e-5, rtol=1e-5)


def test_remat_gives_the_same_features(case_a):
  cfg, _ = golden_eva.config_from_meta(case_a.meta)
  cfg = dataclasses.replace(cfg, remat=True)
  model = _loaded(cfg, lavis_rules(cfg), case_a.params, ignore=[r"ln_vision\..*"])
  pixels = jnp.asarray(np.transpose(case_a.inputs["image"], (0, 2, 3, 1)))
  np.testing.assert_allclose(_forward(model, pixels), case_a.outputs["features"],
                             atol=1e-5, rtol=1e-5)


def test_eva_vit_g_parameter_count():
  cfg = eva_vit.eva_vit_g()
  assert (cfg.grid, cfg.num_tokens, cfg.mlp_dim, cfg.head_dim) == (16, 257, 6144, 88)
  abstract = nnx.eval_shape(lambda: EvaViT(cfg, precision=Precision.bf16(), rngs=nnx.Rngs(0)))
  count = eva_vit.param_count(abstract)
  d, f, p = 1408, 6144, 14
  per_block = (2 * 2 * d  # norm1, norm2
               + d * 3 * d + 2 * d  # qkv kernel, q_bias, v_bias
               + d * d + d  # proj
               + d * f + f + f * d + d)  # fc1, fc2
  expected = (3 * p * p * d + d) + d + 257 * d + 39 * per_block
  assert count == expected == 985_894_528
  # transformers' Blip2VisionModel (default config = ViT-g) has also post_layernorm (2d) and a
  # fused qkv bias with a (zero) key third (d per block).
  assert count + 2 * d + 39 * d == 985_952_256
  state = nnx.state(abstract, nnx.Param)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state))
