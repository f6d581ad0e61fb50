"""The bridge end to end: forward loss against transformers' InstructBLIP, parameter counts,
freezing, and build-time errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from xblip_jax import config_utils
from xblip_jax.convert import eva_vit_keys, llama_keys, mapping, qformer_keys
from xblip_jax.data.text import IGNORE
from xblip_jax.models import assembly
from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip, trainable

NQ, IMAGE_TOKEN = 4, 299


def _hf_model(seed: int) -> T.InstructBlipForConditionalGeneration:
  vc = T.InstructBlipVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=32, patch_size=8,
                                  layer_norm_eps=1e-6, qkv_bias=True)
  qc = T.InstructBlipQFormerConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=128,
                                   max_position_embeddings=32, encoder_hidden_size=48,
                                   cross_attention_frequency=2, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
  tc = T.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6)
  cfg = T.InstructBlipConfig(vision_config=vc.to_dict(), qformer_config=qc.to_dict(),
                             text_config=tc.to_dict(), num_query_tokens=NQ,
                             image_token_index=IMAGE_TOKEN)
  torch.manual_seed(seed)
  model = T.InstructBlipForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # move every weight far from its default so a wrong mapping shows
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05))
  return model


def _ours(hf: T.InstructBlipForConditionalGeneration) -> XInstructBlip:
  vit_cfg = EvaViTConfig(img_size=32, patch_size=8, width=48, depth=2, num_heads=4,
                         mlp_ratio=4.0, layer_norm_eps=1e-6)
  cfg = XBlipConfig(
      encoder_widths=(("image", 48),),
      qformer=QFormerConfig.tiny(encoder_width=48, num_layers=2, num_query_tokens=NQ),
      llm=LlamaConfig.tiny(vocab_size=300), num_query_tokens=NQ, modality_ln_eps=1e-6,
      use_cues=False)
  rngs = nnx.Rngs(0)
  model = XInstructBlip(cfg, rngs=rngs, encoders={"image": EvaViT(vit_cfg, rngs=rngs,
                                                                  precision=_f32())})
  sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  rules = (mapping.prefixed(eva_vit_keys.hf_rules(vit_cfg), "encoders.image.", "vision_model.")
           + mapping.layer_norm("ln.image", "vision_model.post_layernorm")
           + mapping.prefixed(qformer_keys.hf_rules(dataclasses.replace(cfg.qformer)),
                              "qformer.image.", "qformer.")
           + [mapping.copy("query_tokens.image", "query_tokens")]
           + mapping.linear("llm_proj.image", "language_projection")
           + mapping.prefixed(llama_keys.hf_rules(cfg.llm), "llm.", "language_model."))
  mapping.load_state_dict(model, rules, sd, ignore=qformer_keys.HF_IGNORE)
  assert mapping.unmapped_params(model, rules) == []
  return model


def _f32():
  from xblip_jax.models.layers import Precision
  return Precision()


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_loss_matches_transformers_instructblip(seed):
  hf = _hf_model(seed)
  model = _ours(hf)
  rng = np.random.default_rng(seed)
  b, text_len = 3, 9
  pixels = rng.normal(size=(b, 3, 32, 32)).astype(np.float32)
  q_ids = rng.integers(1, 1000, size=(b, 6))
  q_mask = np.ones((b, 6), np.int64)
  q_mask[1, 4:] = 0
  text = rng.integers(3, 290, size=(b, text_len))
  text_mask = np.ones((b, text_len), np.int64)
  text_mask[2, 6:] = 0
  text_labels = np.where(text_mask == 1, text, IGNORE)
  text_labels[:, :3] = IGNORE  # the instruction part is not supervised
  ids = np.concatenate([np.full((b, NQ), IMAGE_TOKEN), text], 1)
  mask = np.concatenate([np.ones((b, NQ), np.int64), text_mask], 1)
  labels = np.concatenate([np.full((b, NQ), IGNORE), text_labels], 1)
  with torch.no_grad():
    ref = hf(pixel_values=torch.tensor(pixels), qformer_input_ids=torch.tensor(q_ids),
             qformer_attention_mask=torch.tensor(q_mask), input_ids=torch.tensor(ids),
             attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
  feats = model.encoders["image"](jnp.asarray(pixels.transpose(0, 2, 3, 1)))[:, None]
  soft = {"image": model.soft_tokens("image", feats, jnp.asarray(q_ids), jnp.asarray(q_mask))}
  out = model(soft, jnp.asarray(text), jnp.asarray(text_mask), jnp.asarray(text_labels),
              assembly.PromptIds(), ("image",))
  np.testing.assert_array_equal(np.asarray(out.labels), labels)
  np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(float(out.loss), float(ref.loss), atol=1e-5, rtol=1e-5)


def test_released_image_bridge_parameter_count():
  """Q-Former for the 1408-wide encoder + LayerNorm + query tokens + projection to 4096."""
  cfg = XBlipConfig(encoder_widths=(("image", 1408),), qformer=QFormerConfig.base(1408),
                    llm=LlamaConfig.vicuna_7b())
  model = nnx.eval_shape(lambda: XInstructBlip(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(model, trainable)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  # 185,660,160 (Q-Former) + 2*1408 (image_ln) + 32*768 (queries) + 768*4096+4096 (llm_proj).
  assert count == 185_660_160 + 2 * 1408 + 32 * 768 + 768 * 4096 + 4096
  assert abs(count - 188.8e6) < 0.1e6
  frozen = nnx.state(model, nnx.Not(trainable))
  llm = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
  assert abs(llm - 6.74e9) < 0.01e9


def test_encoder_width_mismatch_fails_with_both_numbers():
  cfg = XBlipConfig(encoder_widths=(("audio", 32),), qformer=QFormerConfig.tiny(32),
                    llm=LlamaConfig.tiny(), num_query_tokens=4)
  model = XInstructBlip(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"48.*32"):
    model.soft_tokens("audio", jnp.zeros((1, 1, 5, 48)))


def test_config_errors_name_the_field():
  with pytest.raises(config_utils.ConfigError, match="model.qformer.hiden_size"):
    config_utils.build(QFormerConfig, {"preset": "tiny", "hiden_size": 3}, "model.qformer")
  with pytest.raises(config_utils.ConfigError, match="model.llm.num_layers.*int"):
    config_utils.build(LlamaConfig, {"preset": "tiny", "num_layers": "two"}, "model.llm")
  with pytest.raises(config_utils.ConfigError, match="preset"):
    config_utils.build(LlamaConfig, {"preset": "vicuna_70b"}, "model.llm")
  with pytest.raises(ValueError, match="text_pairing"):
    XBlipConfig(text_pairing="zip").validate()


def test_text_pairing_interleave_vs_reference_tile():
  """Frame/clip rows get their own sample's instruction; "tile" reproduces the reference."""
  cfg = XBlipConfig(encoder_widths=(("video", 8),), qformer=QFormerConfig.tiny(8),
                    llm=LlamaConfig.tiny(), num_query_tokens=2)
  model = XInstructBlip(cfg, rngs=nnx.Rngs(0))
  text = jnp.array([[1, 2], [3, 4]])
  np.testing.assert_array_equal(model._pair_text(text, 2, 3), [[1, 2]] * 3 + [[3, 4]] * 3)
  tiled = XInstructBlip(dataclasses.replace(cfg, text_pairing="tile"), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(tiled._pair_text(text, 2, 3), [[1, 2], [3, 4]] * 3)


def test_gradients_reach_only_trainable_parameters():
  cfg = XBlipConfig(encoder_widths=(("pc", 8),), qformer=QFormerConfig.tiny(8, num_layers=2),
                    llm=LlamaConfig.tiny(), num_query_tokens=2)
  model = XInstructBlip(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, trainable, ...)
  assert all(p[0] != "llm" for p, _ in nnx.to_flat_state(params))
  feats = jnp.ones((2, 1, 1, 8))
  ids = jnp.array([[5, 6, 7, 2], [8, 9, 2, 0]])
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  labels = jnp.where(mask == 1, ids, IGNORE)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    soft = {"pc": m.soft_tokens("pc", feats)}
    return m(soft, ids, mask, labels, assembly.PromptIds(), ("pc",)).loss

  grads = jax.grad(loss)(params)
  norms = {mapping.path_str(p): float(jnp.abs(v.get_value()).sum())
           for p, v in nnx.to_flat_state(grads)}
  assert norms["llm_proj.pc.kernel"] > 0 and norms["query_tokens.pc"] > 0
