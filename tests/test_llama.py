"""LLaMA decoder: parity with transformers' LlamaForCausalLM, KV-cached decoding, LAVIS goldens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import golden_cases
from xblip_jax.convert import mapping
from xblip_jax.convert.llama_keys import LAVIS_IGNORE, hf_rules, ignore_patterns
from xblip_jax.golden import load_case
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import Llama, LlamaConfig
from xblip_jax.sharding import DEFAULT_RULES

ATOL = RTOL = 1e-5
MHA = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4)
GQA = dict(MHA, num_key_value_heads=2)


def _hf_model(kwargs: dict, seed: int) -> transformers.LlamaForCausalLM:
  """A random HF model with weights far from their defaults (wrong mappings show clearly)."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**kwargs, rms_norm_eps=1e-6, attn_implementation="eager")
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_()
      else:
        p.normal_(std=p.shape[1] ** -0.5)
  return hf


def _ours(hf: transformers.LlamaForCausalLM, precision: Precision = Precision(), **over) -> Llama:
  """Our model with HF's weights; built abstractly (no initializer runs), then fully loaded."""
  cfg = LlamaConfig.from_hf(hf.config.to_dict(), **over)
  model = nnx.eval_shape(lambda: Llama(cfg, precision=precision, rngs=nnx.Rngs(0)))
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  mapping.load_state_dict(model, hf_rules(cfg), sd, ignore=ignore_patterns(cfg, lavis=False))
  return model


def _random_model(cfg: LlamaConfig, seed: int) -> Llama:
  """A model with numpy-random weights (skips the jitted initializers: faster tests)."""
  model = nnx.eval_shape(lambda: Llama(cfg, precision=Precision(), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var.get_value().shape
    var.set_value(jnp.asarray(rng.normal(0.0, shape[0] ** -0.5, shape), jnp.float32))
  return model


_HF_MODELS: dict[str, transformers.LlamaForCausalLM] = {}


def _hf_named(name: str) -> transformers.LlamaForCausalLM:
  if name not in _HF_MODELS:
    _HF_MODELS[name] = _hf_model(MHA if name == "mha" else GQA, seed=1)
  return _HF_MODELS[name]


@nnx.jit
def _forward(model, embeds, mask, positions=None, cache=None):
  return model(embeds, mask, positions, cache)


def _right_padded_mask(lengths, t):
  return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int64)


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request):
  hf = _hf_named(request.param)
  return hf, _ours(hf)


@pytest.fixture(scope="module")
def gqa():
  hf = _hf_named("gqa")
  return hf, _ours(hf)


def _batch(vocab: int, seed: int = 0):
  """Token ids (3, 11) with right padding of different lengths."""
  ids = np.random.default_rng(seed).integers(0, vocab, (3, 11))
  return ids, _right_padded_mask([11, 7, 3], 11)


def test_logits_match_hf_right_padded(pair):
  hf, model = pair
  ids, mask = _batch(hf.config.vocab_size)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = _forward(model, model.embed(jnp.asarray(ids)), jnp.asarray(mask))
  assert got.logits.dtype == jnp.float32 and got.cache is None
  np.testing.assert_allclose(got.logits, want, atol=ATOL, rtol=RTOL)


def test_key_table_covers_and_round_trips(pair):
  hf, model = pair
  rules = hf_rules(model.cfg)
  assert mapping.unmapped_params(model, rules) == []
  exported = mapping.export_state_dict(model, rules)
  sd = hf.state_dict()
  assert set(exported) == set(sd)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_tied_embeddings_and_no_mask_match_hf():
  hf = _hf_model(dict(MHA, tie_word_embeddings=True), seed=2)
  model = _ours(hf)
  assert model.lm_head is None
  ids = np.random.default_rng(1).integers(0, 97, (2, 5))
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_forward(model, model.embed(jnp.asarray(ids)), None).logits, want,
                             atol=ATOL, rtol=RTOL)


def _hf_cached(hf, ids, mask, positions, steps):
  """HF prefill on the prompt, then one token at a time with `past_key_values`."""
  t = ids.shape[1] - steps
  out, logits = None, []
  with torch.no_grad():
    for lo, hi in [(0, t)] + [(t + s, t + s + 1) for s in range(steps)]:
      out = hf(input_ids=torch.tensor(ids[:, lo:hi]), attention_mask=torch.tensor(mask[:, :hi]),
               position_ids=torch.tensor(positions[:, lo:hi]), use_cache=True,
               past_key_values=None if out is None else out.past_key_values)
      logits.append(out.logits.numpy())
  return np.concatenate(logits, axis=1)


def _decode_case(vocab: int, left_pad: bool, prompt: int = 6, steps: int = 5):
  ids = np.random.default_rng(2).integers(0, vocab, (2, prompt + steps))
  mask = np.ones_like(ids)
  if left_pad:
    mask[1, :3] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  # Padded query rows attend to nothing; their outputs are undefined and not compared.
  return ids, mask, positions, mask.astype(bool)


@pytest.mark.parametrize("left_pad", [False, True])
def test_cached_decoding_matches_full_forward_and_hf(gqa, left_pad):
  hf, model = gqa
  steps = 5
  ids, mask, positions, valid = _decode_case(hf.config.vocab_size, left_pad, steps=steps)
  t = ids.shape[1] - steps
  embeds = model.embed(jnp.asarray(ids))
  full = _forward(model, embeds, jnp.asarray(mask), jnp.asarray(positions)).logits
  cache = model.init_cache(ids.shape[0], 16, jnp.float32)
  logits = []
  for lo, hi in [(0, t)] + [(t + s, t + s + 1) for s in range(steps)]:
    out = _forward(model, embeds[:, lo:hi], jnp.asarray(mask[:, lo:hi]),
                   jnp.asarray(positions[:, lo:hi]), cache)
    cache = out.cache
    logits.append(np.asarray(out.logits))
  assert int(cache.index) == ids.shape[1]
  np.testing.assert_array_equal(cache.mask[:, :ids.shape[1]], valid)
  cached = np.concatenate(logits, axis=1)
  want = _hf_cached(hf, ids, mask, positions, steps)
  np.testing.assert_allclose(cached[valid], np.asarray(full)[valid], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(cached[valid], want[valid], atol=ATOL, rtol=RTOL)


def test_decode_loop_in_fori_loop_with_default_positions(gqa):
  """Prefill + `fori_loop` of single-token steps under one jit, positions left to the cache
  (which must reproduce HF's cumsum(mask) - 1 under left padding)."""
  hf, model = gqa
  steps = 5
  ids, mask, positions, valid = _decode_case(hf.config.vocab_size, True, steps=steps)
  t = ids.shape[1] - steps
  graphdef, state = nnx.split(model)

  @jax.jit
  def decode(state, ids, mask):
    m = nnx.merge(graphdef, state)
    out = m(m.embed(ids[:, :t]), mask[:, :t], cache=m.init_cache(2, 12, jnp.float32))

    def body(i, carry):
      cache, logits = carry
      tok = jax.lax.dynamic_slice_in_dim(ids, t + i, 1, axis=1)
      step = m(m.embed(tok), jax.lax.dynamic_slice_in_dim(mask, t + i, 1, axis=1), cache=cache)
      return step.cache, jax.lax.dynamic_update_slice_in_dim(logits, step.logits, t + i, axis=1)

    logits = jnp.zeros(ids.shape + (model.cfg.vocab_size,), jnp.float32)
    logits = logits.at[:, :t].set(out.logits)
    return jax.lax.fori_loop(0, steps, body, (out.cache, logits))[1]

  got = np.asarray(decode(state, jnp.asarray(ids), jnp.asarray(mask)))
  want = _hf_cached(hf, ids, mask, positions, steps)
  np.testing.assert_allclose(got[valid], want[valid], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("path", golden_cases("llm_assembly"), ids=lambda p: p.stem)
def test_golden_llm_logits(path):
  case = load_case(path)
  cfg = LlamaConfig.from_hf(case.meta["config"]["llm_config"])
  model = nnx.eval_shape(lambda: Llama(cfg, precision=Precision(), rngs=nnx.Rngs(0)))
  report = mapping.load_state_dict(model, hf_rules(cfg), case.params, prefix="llm_model.",
                                   ignore=LAVIS_IGNORE)
  assert report.loaded == len(hf_rules(cfg))
  assert mapping.unmapped_params(model, hf_rules(cfg)) == []
  for variant in ("", "fixed_"):
    embeds = jnp.asarray(case.outputs[f"{variant}inputs_embeds"])
    mask = jnp.asarray(case.outputs[f"{variant}attention_mask"])
    got = _forward(model, embeds, mask).logits
    np.testing.assert_allclose(got, case.outputs[f"{variant}logits"], atol=1e-5, rtol=1e-5,
                               err_msg=f"{path.stem} {variant}logits")


def _count_from_shapes(cfg: LlamaConfig) -> int:
  d, f, v, kv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_kv_heads
  attn = 2 * d * d + 2 * d * kv * cfg.head_dim
  per_layer = attn + 3 * d * f + 2 * d
  return cfg.num_layers * per_layer + 2 * v * d + d


@pytest.mark.parametrize("preset,expected", [("vicuna_7b", 6_738_423_808),
                                             ("vicuna_13b", 13_015_874_560)])
def test_parameter_count(preset, expected):
  cfg = getattr(LlamaConfig, preset)()
  abstract = nnx.eval_shape(lambda: Llama(cfg, precision=Precision.bf16(), rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  count = sum(int(np.prod(x.shape)) for x in leaves)
  assert count == _count_from_shapes(cfg) == expected
  assert {x.dtype for x in leaves} == {jnp.dtype("bfloat16")}


def test_logical_axes_on_every_param():
  cfg = LlamaConfig.tiny(num_kv_heads=2)
  model = nnx.eval_shape(lambda: Llama(cfg, precision=Precision(), rngs=nnx.Rngs(0)))
  known = {name for name, _ in DEFAULT_RULES}
  expected = {"embedding": ("vocab", "embed"), "q_proj": ("embed", "heads"),
              "k_proj": ("embed", "kv"), "v_proj": ("embed", "kv"), "o_proj": ("heads", "embed"),
              "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
              "down_proj": ("mlp", "embed"), "lm_head": ("embed", "vocab"), "scale": ("norm",)}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path
    assert set(axes) <= known, path
    key = next(k for k in expected if k in {str(p) for p in path})
    assert tuple(axes) == expected[key], path


def test_bf16_compute_close_to_float32(gqa):
  hf, ref = gqa
  fast = _ours(hf, Precision.bf16_compute())
  ids, mask = map(jnp.asarray, _batch(hf.config.vocab_size))
  want = np.asarray(_forward(ref, ref.embed(ids), mask).logits)  # compiled by the parity test
  out = _forward(fast, fast.embed(ids), mask)
  assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
  scale = np.abs(want).max()
  err = np.abs(np.asarray(out.logits) - want).max()
  assert err < 0.05 * scale, (err, scale)
  # Cached bf16 decoding runs (bf16 cache) and agrees with the bf16 full forward.
  cache = fast.init_cache(3, 12)
  assert cache.dtype == jnp.bfloat16
  pre = _forward(fast, fast.embed(ids[:, :6]), mask[:, :6], None, cache)
  step = _forward(fast, fast.embed(ids[:, 6:7]), mask[:, 6:7], None, pre.cache)
  np.testing.assert_allclose(step.logits[0, 0], out.logits[0, 6], atol=0.05 * scale)


def test_remat_policies():
  """"dots" gives the gradients of no remat; every policy puts a checkpoint in the graph."""
  cfg = LlamaConfig.tiny(vocab_size=61, num_kv_heads=2, num_layers=1)
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 7)))

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(model.embed(ids)).logits)[..., 0])

  models = {p: _random_model(dataclasses.replace(cfg, remat_policy=p), seed=6)
            for p in ("none", "full", "dots")}
  for policy, model in models.items():
    graphdef, params = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(nnx.merge(graphdef, p))))(params))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (policy != "none"), policy
  plain, dots = (jax.tree.leaves(nnx.jit(nnx.grad(loss))(models[p])) for p in ("none", "dots"))
  for a, b in zip(plain, dots, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_config_presets():
  c7, c13 = LlamaConfig.vicuna_7b(), LlamaConfig.vicuna_13b()
  assert (c7.vocab_size, c7.hidden_size, c7.num_layers, c7.num_heads, c7.head_dim) == (
      32001, 4096, 32, 32, 128)
  assert (c13.hidden_size, c13.intermediate_size, c13.num_layers, c13.num_heads) == (
      5120, 13824, 40, 40)
  assert dataclasses.replace(LlamaConfig.tiny(), num_kv_heads=2).head_dim == 16
  with pytest.raises(ValueError):
    LlamaConfig.tiny(remat_policy="some")
