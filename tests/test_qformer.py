"""Q-Former: LAVIS goldens, transformers parity, key tables, parameter count, config errors."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import golden_cases
from xblip_jax.convert.mapping import export_state_dict, load_state_dict, unmapped_params
from xblip_jax.convert.qformer_keys import (HF_IGNORE, LAVIS_IGNORE, hf_rules, lavis_rules,
                                            lavis_to_hf_key)
from xblip_jax.golden import load_case
from xblip_jax.golden import qformer as golden_qformer
from xblip_jax.models.layers import Precision
from xblip_jax.models.qformer import QFormer, QFormerConfig
from xblip_jax.sharding import DEFAULT_RULES

# Two layers: one with cross-attention (layer 0), one without.
TINY = QFormerConfig.tiny(encoder_width=24, vocab_size=50, hidden_size=32, num_layers=2,
                          num_heads=4, intermediate_size=64, max_position_embeddings=16,
                          num_query_tokens=4, hidden_dropout=0.0, attention_dropout=0.0)


def _abstract(cfg: QFormerConfig, precision: Precision = Precision.float32()) -> QFormer:
  return nnx.eval_shape(lambda: QFormer(cfg, precision=precision, rngs=nnx.Rngs(0)))


def _loaded(cfg: QFormerConfig, rules, state_dict, **kw) -> QFormer:
  model = _abstract(cfg)
  load_state_dict(model, rules, state_dict, **kw)
  return model


def _apply(model: QFormer, *args, **kw):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, a: nnx.merge(graphdef, s)(*a, **kw))
  return fn(state, args)


# ----------------------------------------------------------------------------- LAVIS goldens


@pytest.mark.parametrize("path", golden_cases("qformer"), ids=lambda p: p.stem)
def test_golden(path):
  comparisons = golden_qformer.check(load_case(path))
  assert comparisons
  assert all(c.ok for c in comparisons), "\n".join(c.line() for c in comparisons)


# ------------------------------------------------------------------ transformers (PyTorch)


@pytest.fixture(scope="module")
def hf_model():
  return _build_hf_model()


def _build_hf_model():
  """A random `InstructBlipQFormerModel` of the TINY sizes, weights far from their defaults."""
  torch = pytest.importorskip("torch")
  from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

  config = InstructBlipQFormerConfig(
      vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
      num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
      intermediate_size=TINY.intermediate_size, hidden_act="gelu", hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, max_position_embeddings=TINY.max_position_embeddings,
      layer_norm_eps=TINY.layer_norm_eps, cross_attention_frequency=TINY.cross_attention_freq,
      encoder_hidden_size=TINY.encoder_width)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = InstructBlipQFormerModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name.lower():  # LayerNorm: weight 1 + N(0, 0.2²), bias N(0, 0.2²)
        p.copy_(0.2 * torch.randn_like(p) + (1.0 if name.endswith("weight") else 0.0))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif "embeddings" in name:
        p.copy_(torch.randn_like(p))
      else:  # Linear weight (out, in)
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, state


def _hf_forward(model, queries, enc, ids=None, text_mask=None, enc_mask=None) -> np.ndarray:
  import torch
  t = lambda x: None if x is None else torch.from_numpy(np.asarray(x))
  mask = None
  if ids is not None:
    mask = np.concatenate([np.ones(queries.shape[:2], np.int64), text_mask], axis=1)
  with torch.no_grad():
    out = model(input_ids=t(ids), attention_mask=t(mask), query_embeds=t(queries),
                encoder_hidden_states=t(enc), encoder_attention_mask=t(enc_mask))
  return out.last_hidden_state.numpy()


def _inputs(seed: int, batch: int, num_enc: int, text_lengths: list[int] | None):
  rng = np.random.default_rng(seed)
  queries = rng.standard_normal((batch, TINY.num_query_tokens, TINY.hidden_size), np.float32)
  enc = rng.standard_normal((batch, num_enc, TINY.encoder_width), np.float32)
  enc_mask = (rng.random((batch, num_enc)) > 0.3).astype(np.int64)
  enc_mask[:, 0] = 1  # at least one visible encoder token per row
  if text_lengths is None:
    return queries, enc, None, None, enc_mask
  length = max(text_lengths)
  ids = rng.integers(1, TINY.vocab_size, (batch, length)).astype(np.int64)
  text_mask = (np.arange(length)[None] < np.array(text_lengths)[:, None]).astype(np.int64)
  ids = ids * text_mask  # right padding with [PAD] = 0
  return queries, enc, ids, text_mask, enc_mask


@pytest.mark.parametrize("batch,num_enc,text_lengths", [
    (2, 5, [6, 3]),  # padded text, partly masked encoder
    (3, 7, None),  # text_input=True model called with queries only
])
def test_matches_transformers(hf_model, batch, num_enc, text_lengths):
  model_pt, state = hf_model
  model = _loaded(TINY, hf_rules(TINY), state, ignore=HF_IGNORE)
  queries, enc, ids, text_mask, enc_mask = _inputs(batch, batch, num_enc, text_lengths)
  want = _hf_forward(model_pt, queries, enc, ids, text_mask, enc_mask)
  out = _apply(model, queries, enc, ids, text_mask, enc_mask)
  assert out.last_hidden_state.shape == want.shape
  np.testing.assert_allclose(out.last_hidden_state, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out.query_output, want[:, :TINY.num_query_tokens], atol=1e-5,
                             rtol=1e-5)


def test_text_input_false_matches_transformers(hf_model):
  """No word/position embeddings or text FFNs; equals transformers called without text."""
  model_pt, state = hf_model
  cfg = dataclasses.replace(TINY, text_input=False)
  rules = hf_rules(cfg)
  names = {k for r in rules for k in r.theirs}
  dropped = sorted(set(state) - names)
  assert dropped and all(re.search(r"word_emb|position_emb|\.intermediate\.|\.output\.(dense|"
                                   r"LayerNorm)", k) and "attention" not in k for k in dropped)
  model = _loaded(cfg, rules, {k: state[k] for k in names})
  queries, enc, _, _, enc_mask = _inputs(7, 2, 5, None)
  want = _hf_forward(model_pt, queries, enc, enc_mask=enc_mask)
  out = _apply(model, queries, enc, None, None, enc_mask)
  np.testing.assert_allclose(out.last_hidden_state, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="text_input=False"):
    jax.eval_shape(lambda: model(queries, enc, input_ids=jnp.zeros((2, 3), jnp.int32)))


# --------------------------------------------------------------------------- key tables


@pytest.mark.parametrize("text_input", [True, False])
def test_rules_cover_every_param(text_input):
  cfg = QFormerConfig.tiny(text_input=text_input)
  model = _abstract(cfg)
  assert unmapped_params(model, lavis_rules(cfg)) == []
  assert unmapped_params(model, hf_rules(cfg)) == []


def test_export_round_trip(hf_model):
  _, state = hf_model
  model = _loaded(TINY, hf_rules(TINY), state, ignore=HF_IGNORE)
  exported = export_state_dict(model, hf_rules(TINY))
  assert set(exported) == {k for k in state if not k.endswith("position_ids")}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)
  # Through the LAVIS names and back, under the full model's prefix.
  lavis = export_state_dict(model, lavis_rules(TINY), prefix="audio_Qformer.")
  assert all(lavis_to_hf_key(k[len("audio_Qformer."):]) in state for k in lavis)
  again = _loaded(TINY, lavis_rules(TINY), lavis, prefix="audio_Qformer.", ignore=LAVIS_IGNORE)
  for k, v in export_state_dict(again, hf_rules(TINY)).items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)


# ------------------------------------------------------------------- full-size shapes


def _spec_state_dict_shapes(width: int) -> dict[str, tuple[int, ...]]:
  """The trained `<m>_Qformer.bert.*` tensors of one modality (spec section 5.2), 12 layers."""
  d, f = 768, 3072
  shapes = {"bert.embeddings.word_embeddings.weight": (30523, d),
            "bert.embeddings.position_embeddings.weight": (512, d),
            "bert.embeddings.LayerNorm.weight": (d,), "bert.embeddings.LayerNorm.bias": (d,)}
  lin = lambda key, n_out, n_in: {f"{key}.weight": (n_out, n_in), f"{key}.bias": (n_out,)}
  ln = lambda key: {f"{key}.weight": (d,), f"{key}.bias": (d,)}
  for i in range(12):
    p = f"bert.encoder.layer.{i}."
    blocks = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
    for blk in blocks:
      kv_in = width if blk == "crossattention" else d
      shapes |= lin(p + blk + ".self.query", d, d)
      shapes |= lin(p + blk + ".self.key", d, kv_in) | lin(p + blk + ".self.value", d, kv_in)
      shapes |= lin(p + blk + ".output.dense", d, d) | ln(p + blk + ".output.LayerNorm")
    for sfx in ("", "_query"):
      shapes |= lin(f"{p}intermediate{sfx}.dense", f, d) | lin(f"{p}output{sfx}.dense", d, f)
      shapes |= ln(f"{p}output{sfx}.LayerNorm")
  return shapes


def test_base_parameter_count_and_shapes():
  cfg = QFormerConfig.base(1408)
  params = {k: v for k, v in nnx.to_flat_state(nnx.state(_abstract(cfg), nnx.Param))}
  ours = {".".join(map(str, k)): tuple(v.get_value().shape) for k, v in params.items()}
  spec = _spec_state_dict_shapes(1408)
  # Same tensors as the spec, each with the matching shape (Linear kernels transposed).
  by_key = {}
  for r in lavis_rules(cfg):
    (our_key,), (their_key,) = r.ours, r.theirs
    shape = ours[our_key]
    by_key[their_key] = shape[::-1] if our_key.endswith("kernel") else shape
  assert by_key == spec
  count = sum(math.prod(s) for s in ours.values())
  assert count == sum(math.prod(s) for s in spec.values()) == 185_660_160
  # With image_ln (1408), the 32 query tokens and the projection to Vicuna-7B: ~188.8M.
  bridge = 2 * 1408 + 32 * 768 + 768 * 4096 + 4096
  assert round((count + bridge) / 1e6, 1) == 188.8


def test_logical_axes_and_bf16_shapes():
  allowed = {name for name, _ in DEFAULT_RULES}
  model = _abstract(TINY, Precision.bf16())
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes and len(axes) == var.get_value().ndim and set(axes) <= allowed, (path, axes)
    assert var.get_value().dtype == jnp.bfloat16
  enc_axes = model.layers[0].cross_attention.key.kernel.get_metadata()["out_sharding"]
  assert enc_axes == ("enc_embed", "heads")
  q = jax.ShapeDtypeStruct((2, TINY.num_query_tokens, TINY.hidden_size), jnp.float32)
  e = jax.ShapeDtypeStruct((2, 5, TINY.encoder_width), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 3), jnp.int32)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, q, e, i: nnx.merge(graphdef, s)(q, e, i), state, q, e, ids)
  assert out.last_hidden_state.shape == (2, TINY.num_query_tokens + 3, TINY.hidden_size)
  assert out.last_hidden_state.dtype == jnp.bfloat16


# --------------------------------------------------------------------------- behaviour


def test_encoder_width_mismatch_is_a_clear_error():
  cfg = QFormerConfig.tiny(encoder_width=48)
  model = _abstract(cfg)
  q = jnp.zeros((1, cfg.num_query_tokens, cfg.hidden_size))
  with pytest.raises(ValueError, match=r"width 40.*encoder_width is 48"):
    jax.eval_shape(lambda: model(q, jnp.zeros((1, 5, 40))))


def test_dropout_only_when_not_deterministic(hf_model):
  _, state = hf_model
  # One layer (with cross-attention) keeps the compile short; every dropout site is still there.
  cfg = dataclasses.replace(TINY, num_layers=1, hidden_dropout=0.1, attention_dropout=0.1)
  rules = hf_rules(cfg)
  model = _loaded(cfg, rules, {k: state[k] for r in rules for k in r.theirs})
  queries, enc, ids, text_mask, _ = _inputs(3, 2, 5, [4, 2])
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, key):
    m = nnx.merge(graphdef, params)
    eval_out = m(queries, enc, ids, text_mask).last_hidden_state
    train = m(queries, enc, ids, text_mask, deterministic=False, rngs=nnx.Rngs(dropout=key))
    return eval_out, train.last_hidden_state

  # rbg keys: threefry's bit generation, inlined at every dropout site, is slow to compile on CPU.
  eval_a, train_a = run(params, jax.random.key(0, impl="rbg"))
  eval_b, train_b = run(params, jax.random.key(1, impl="rbg"))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.isfinite(train_a).all()
  assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
  with pytest.raises(ValueError, match="rngs"):
    jax.eval_shape(lambda: model(queries, enc, ids, text_mask, deterministic=False))
