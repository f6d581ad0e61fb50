"""Decoding: token-for-token parity with transformers' `generate(inputs_embeds=...)` (greedy, beam
search with length / repetition penalties and minimum length), batch-vs-single equality under
padding, seeded sampling, the logits processors against HF's, and the reference presets.

The tiny model's LM head is scaled up so next-token distributions are peaked (no near-ties that
float noise could flip) and its EOS row is boosted so that rows finish at different steps.
Programs are compiled at XLA backend optimisation level 0 (same results, faster compiles).

Set `XBLIP_HF433_PATH` to a directory holding transformers 4.33.2 (`pip install --no-deps
--target DIR transformers==4.33.2`) to also check the reference's 4.33 semantics against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from xblip_jax.convert import mapping
from xblip_jax.convert.llama_keys import hf_rules, ignore_patterns
from xblip_jax.decode import logits as lp
from xblip_jax.decode.api import DecodeConfig, jit_generate
from xblip_jax.decode.greedy import greedy_decode
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import Llama, LlamaConfig

VOCAB, HIDDEN, EOS, PAD, BOS = 40, 32, 2, 0, 1
N_NEW, B, T = 12, 3, 7
FAST = {"xla_backend_optimization_level": 0}
HF_CFG = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**HF_CFG, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_()
      else:  # peaked logits: a 3x wider LM head
        p.normal_(std=(3.0 if "lm_head" in name else 1.0) * p.shape[1] ** -0.5)
    hf.lm_head.weight[EOS] *= 2.0
  cfg = LlamaConfig.from_hf(hf.config.to_dict())
  ours = nnx.eval_shape(lambda: Llama(cfg, precision=Precision(), rngs=nnx.Rngs(0)))
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  mapping.load_state_dict(ours, hf_rules(cfg), sd, ignore=ignore_patterns(cfg, lavis=False))
  return hf, ours


def _prompt(seed: int, b: int = B, t: int = T, lengths=None):
  """Embeddings and a mask; padding sits in the middle (the first token is real), as in
  `[cue][soft tokens][left-padded instruction]`, unless `lengths` asks for left padding (not
  used against HF: transformers 5 then exempts early tokens from the repetition penalty)."""
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(b, t, HIDDEN)).astype(np.float32)
  mask = np.ones((b, t), np.int32)
  if lengths is None:
    for i in range(1, b):
      start = rng.integers(1, t - 2)
      mask[i, start:start + rng.integers(1, 3)] = 0
  else:
    for i, n in enumerate(lengths):
      mask[i, :t - n] = 0
  return emb, mask


def _ours(model, cfg, emb, mask, key=None):
  ids, scores = jit_generate(model, cfg, FAST)(jnp.asarray(emb), jnp.asarray(mask), key)
  return np.asarray(ids), np.asarray(scores)


def _hf(hf, emb, mask, **kw):
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = hf.generate(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(mask),
                      eos_token_id=EOS, pad_token_id=PAD, output_scores=True,
                      return_dict_in_generate=True, **{"do_sample": False, **kw})
  scores = getattr(out, "sequences_scores", None)
  return out.sequences.numpy(), None if scores is None else scores.numpy()


def _assert_same(ours: np.ndarray, theirs: np.ndarray):
  """Equal up to and including each row's EOS; ours is `PAD` after it (HF 5 fills beam outputs
  with EOS when the pad id is 0, and crops to the longest row)."""
  for row_ours, row_theirs in zip(ours, theirs):
    hit = np.flatnonzero(row_theirs == EOS)
    n = hit[0] + 1 if hit.size else N_NEW
    assert n <= N_NEW and len(row_theirs) >= n
    np.testing.assert_array_equal(row_ours[:n], row_theirs[:n])
    assert np.all(row_ours[n:] == PAD)


def _v5(**kw) -> DecodeConfig:
  base = dict(num_beams=1, max_new_tokens=N_NEW, repetition_penalty=1.0, length_penalty=1.0,
              hf_version="5", eos_id=EOS, pad_id=PAD, bos_id=BOS)
  return DecodeConfig(**{**base, **kw})


def _hf_kwargs(cfg: DecodeConfig) -> dict:
  return dict(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
              min_new_tokens=cfg.min_new_tokens, repetition_penalty=cfg.repetition_penalty,
              length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping,
              num_return_sequences=cfg.num_return_sequences)


@pytest.mark.parametrize("kw", [{}, dict(repetition_penalty=1.5, min_new_tokens=4)],
                         ids=["plain", "rep1.5_min4"])
def test_greedy_matches_hf(models, kw):
  hf, ours = models
  emb, mask = _prompt(2)
  cfg = _v5(**kw)
  ids, _ = _ours(ours, cfg, emb, mask)
  _assert_same(ids, _hf(hf, emb, mask, **_hf_kwargs(cfg))[0])
  if not kw:  # the prompt was chosen so that rows finish early and late
    assert (ids == EOS).any(axis=1).tolist() == [True, False, True]


BEAM_CASES = {
    "k3": dict(num_beams=3),
    "k3_lp2_early": dict(num_beams=3, length_penalty=2.0, early_stopping=True),
    "k5_rep1.5_min5": dict(num_beams=5, repetition_penalty=1.5, min_new_tokens=5),
    "k5_lp-1_rep1.15": dict(num_beams=5, length_penalty=-1.0, repetition_penalty=1.15),
    "k5_lp0_min2": dict(num_beams=5, length_penalty=0.0, min_new_tokens=2),
    "k4_n3": dict(num_beams=4, num_return_sequences=3),
    "k5_n5_lp-1_rep1.5_min2": dict(num_beams=5, num_return_sequences=5, length_penalty=-1.0,
                                   repetition_penalty=1.5, min_new_tokens=2),
}


@pytest.mark.parametrize("name", list(BEAM_CASES))
def test_beam_matches_hf(models, name):
  hf, ours = models
  emb, mask = _prompt(3)
  cfg = _v5(**BEAM_CASES[name])
  ids, scores = _ours(ours, cfg, emb, mask)
  want, want_scores = _hf(hf, emb, mask, **_hf_kwargs(cfg))
  _assert_same(ids, want)
  if name == "k3":
    assert (ids == EOS).any(axis=1).tolist() == [True, False, True]
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  n = cfg.num_return_sequences
  if n > 1:  # a row's n best hypotheses, adjacent, best first; the first is what n = 1 gives
    assert ids.shape == (B * n, N_NEW) and (np.diff(scores.reshape(B, n), axis=1) <= 0).all()
    one, one_scores = _ours(ours, _v5(**{**BEAM_CASES[name], "num_return_sequences": 1}), emb,
                            mask)
    np.testing.assert_array_equal(ids[::n], one)
    np.testing.assert_allclose(scores[::n], one_scores, rtol=1e-6)


def test_sampling_num_return_sequences(models):
  """n samples per row: row b's samples are rows b*n..b*n+n-1, each the row decoded alone under
  its share of the row's key; with top_k 1 they all equal HF's (deterministic) samples."""
  hf, ours = models
  emb, mask = _prompt(4)
  n = 3
  cfg = _v5(do_sample=True, temperature=2.0, top_k=0, top_p=1.0, num_return_sequences=n)
  keys = jax.random.split(jax.random.key(5), B)
  ids, scores = _ours(ours, cfg, emb, mask, keys)
  assert ids.shape == (B * n, N_NEW) and scores.shape == (B * n,)
  sub = jax.vmap(lambda k: jax.random.split(k, n))(keys).reshape(B * n)
  single = _v5(do_sample=True, temperature=2.0, top_k=0, top_p=1.0)
  alone, alone_scores = _ours(ours, single, np.repeat(emb, n, 0), np.repeat(mask, n, 0), sub)
  np.testing.assert_array_equal(ids, alone)
  np.testing.assert_allclose(scores, alone_scores, rtol=1e-5, atol=1e-5)
  assert all(len({tuple(r) for r in ids[i * n:(i + 1) * n]}) > 1 for i in range(B))
  top1 = _v5(do_sample=True, top_k=1, repetition_penalty=1.3, num_return_sequences=n)
  got, _ = _ours(ours, top1, emb, mask, jax.random.key(0))
  want, _ = _hf(hf, emb, mask, do_sample=True, top_k=1, **_hf_kwargs(top1))
  assert len(want) == B * n
  _assert_same(got, want)


def test_num_return_sequences_validation():
  with pytest.raises(ValueError, match="num_return_sequences"):
    _v5(num_beams=3, num_return_sequences=4)
  with pytest.raises(ValueError, match="greedy"):
    _v5(num_return_sequences=2)


@pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "beam5"])
def test_batch_equals_single(models, num_beams):
  """Rows with prompts of different lengths (left and middle padding) decode as they do alone."""
  _, ours = models
  cfg = _v5(num_beams=num_beams, repetition_penalty=1.3, min_new_tokens=2,
            length_penalty=0.5)
  for seed in range(2):
    emb, mask = _prompt(10 + seed, lengths=[T, 5, 5])
    if seed:  # middle padding in the last row
      mask[2] = [1, 0, 0, 1, 1, 1, 1]
    ids, scores = _ours(ours, cfg, emb, mask)
    for i in range(B):
      keep = mask[i].astype(bool)
      one, one_score = _ours(ours, cfg, emb[i:i + 1, keep], mask[i:i + 1, keep])
      np.testing.assert_array_equal(ids[i], one[0])
      np.testing.assert_allclose(scores[i], one_score[0], rtol=1e-5, atol=1e-6)


def test_greedy_decode_wrapper(models):
  """The trainer's `greedy_decode` equals `generate` greedy with no penalty."""
  _, ours = models
  emb, mask = _prompt(3)
  got = nnx.jit(greedy_decode, static_argnames=("max_new_tokens", "eos_id", "pad_id"))(
      ours, jnp.asarray(emb), jnp.asarray(mask), max_new_tokens=N_NEW, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(got), _ours(ours, _v5(), emb, mask)[0])


def test_sampling_seeded(models):
  _, ours = models
  emb, mask = _prompt(4)
  cfg = _v5(do_sample=True, top_p=0.9, temperature=1.5, top_k=0)
  key = jax.random.key(0)
  a, _ = _ours(ours, cfg, emb, mask, key)
  np.testing.assert_array_equal(a, _ours(ours, cfg, emb, mask, key)[0])
  others = [_ours(ours, cfg, emb, mask, jax.random.key(s))[0] for s in (1, 2)]
  assert any((o != a).any() for o in others)
  # One key per row: a row's sample does not depend on its batch neighbours.
  keys = jax.random.split(jax.random.key(7), B)
  perm = np.array([2, 0, 1])
  full, _ = _ours(ours, cfg, emb, mask, keys)
  permuted, _ = _ours(ours, cfg, emb[perm], mask[perm], keys[perm])
  np.testing.assert_array_equal(full[perm], permuted)
  # A vanishing nucleus keeps only the most likely token: greedy (same penalties).
  tiny = _ours(ours, _v5(do_sample=True, top_p=1e-6, repetition_penalty=1.5), emb, mask, key)
  np.testing.assert_array_equal(tiny[0], _ours(ours, _v5(repetition_penalty=1.5), emb, mask)[0])


def test_beam_sampling_seeded(models):
  """Beam sampling (HF 4.33 `beam_sample`): reproducible under a key, varies across keys."""
  _, ours = models
  emb, mask = _prompt(4)
  cfg = _v5(num_beams=3, do_sample=True, top_p=0.9, temperature=2.0)
  a, scores = _ours(ours, cfg, emb, mask, jax.random.key(0))
  np.testing.assert_array_equal(a, _ours(ours, cfg, emb, mask, jax.random.key(0))[0])
  assert any((_ours(ours, cfg, emb, mask, jax.random.key(s))[0] != a).any() for s in (1, 2))
  assert np.isfinite(scores).all() and ((a >= 0) & (a < VOCAB)).all()
  for row in a:  # nothing but padding after an EOS
    hit = np.flatnonzero(row == EOS)
    assert not hit.size or (row[hit[0] + 1:] == PAD).all()


def test_processors_match_hf():
  from transformers.generation import logits_process as hfp  # pylint: disable=C0415
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(4, 50)).astype(np.float32) * 3
  hist = rng.integers(0, 50, size=(4, 6))
  hs, hh = torch.tensor(scores), torch.tensor(hist)
  top_p = ((0.9, 1), (0.3, 2), (1e-6, 1))

  @jax.jit
  def ours(x, h):
    seen = lp.seen_tokens(h, jnp.ones(h.shape, bool), 50)
    return ([lp.repetition_penalty(x, seen, 1.3), lp.top_k_filter(x, 7), lp.temperature(x, 0.7)]
            + [lp.top_p_filter(x, p, keep) for p, keep in top_p])

  want = [hfp.RepetitionPenaltyLogitsProcessor(1.3), hfp.TopKLogitsWarper(7),
          hfp.TemperatureLogitsWarper(0.7)]
  want += [hfp.TopPLogitsWarper(p, min_tokens_to_keep=keep) for p, keep in top_p]
  for got, proc in zip(ours(jnp.asarray(scores), jnp.asarray(hist)), want):
    np.testing.assert_allclose(np.asarray(got), proc(hh, hs.clone()).numpy(), rtol=1e-6)
  # Only the valid history counts; 4.33's BOS counts as seen.
  seen = lp.seen_tokens(jnp.asarray([[5, 6, 7]]), jnp.asarray([[True, True, False]]), 10, (1,))
  assert np.flatnonzero(np.asarray(seen[0])).tolist() == [1, 5, 6]
  masked = lp.suppress_eos(jnp.asarray(scores), EOS, jnp.bool_(True))
  assert np.isneginf(np.asarray(masked)[:, EOS]).all()


def test_presets():
  cap, vqa, demo, ref = (DecodeConfig.caption(), DecodeConfig.vqa(), DecodeConfig.demo(),
                         DecodeConfig.reference())
  assert (cap.num_beams, cap.max_new_tokens, cap.min_new_tokens) == (5, 79, 9)
  assert (cap.length_penalty, cap.repetition_penalty, cap.do_sample) == (1.0, 1.15, False)
  assert (vqa.max_new_tokens, vqa.min_new_tokens, vqa.length_penalty) == (9, 0, -1.0)
  assert vqa.repetition_penalty == 1.5 and demo.max_new_tokens == 249
  assert (ref.num_beams, ref.max_new_tokens, ref.top_p, ref.top_k) == (5, 255, 0.9, 50)
  assert (ref.bos_id, ref.eos_id, ref.pad_id, ref.hf_version) == (1, 2, 0, "4.33")
  v5 = DecodeConfig.from_lavis(max_len=80, min_len=10, hf_version="5")
  assert (v5.max_new_tokens, v5.min_new_tokens) == (80, 10)
  assert cap.static_part() == DecodeConfig.caption(repetition_penalty=1.5).static_part()
  assert cap.history_extra_ids == (1,) and v5.history_extra_ids == ()
  with pytest.raises(ValueError):
    DecodeConfig(hf_version="4.28")


_HF433_SCRIPT = r"""
import importlib.metadata as md, json, sys
_real = md.version
md.version = lambda n: {"tokenizers": "0.13.3", "huggingface-hub": "0.17.3"}.get(n) or _real(n)
import numpy as np, torch, transformers
assert transformers.__version__.startswith("4.33"), transformers.__version__
data = np.load(sys.argv[1])
hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(str(data["config"]))))
hf.eval().load_state_dict({k[3:]: torch.tensor(data[k]) for k in data.files if k[:3] == "sd."},
                          strict=False)
out = {}
with torch.no_grad():
  for i, kw in enumerate(json.loads(str(data["runs"]))):
    r = hf.generate(inputs_embeds=torch.tensor(data["embeds"]), attention_mask=torch.tensor(
        data["mask"]), return_dict_in_generate=True, output_scores=True, **kw)
    out[f"seq{i}"] = r.sequences.numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.skipif(not os.environ.get("XBLIP_HF433_PATH"), reason="XBLIP_HF433_PATH not set")
def test_matches_transformers_4_33(models, tmp_path):
  """The reference's semantics (BOS-initialised `input_ids`) against transformers 4.33.2."""
  hf, ours = models
  emb, mask = _prompt(5)
  cases = [dict(num_beams=1, repetition_penalty=1.5, min_new_tokens=3)]
  cases += [dict(BEAM_CASES[k], hf_version="4.33") for k in BEAM_CASES]
  cfgs = [_v5(**dict(c, hf_version="4.33")) for c in cases]
  runs = [dict(num_beams=c.num_beams, max_length=c.max_new_tokens + 1,
               min_length=c.min_new_tokens + 1, repetition_penalty=c.repetition_penalty,
               length_penalty=c.length_penalty, early_stopping=c.early_stopping,
               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
          for c in cfgs]
  sd = {f"sd.{k}": v.numpy() for k, v in hf.state_dict().items()}
  np.savez(tmp_path / "in.npz", embeds=emb, mask=mask, config=json.dumps(HF_CFG),
           runs=json.dumps(runs), **sd)
  (tmp_path / "run.py").write_text(_HF433_SCRIPT)
  env = dict(os.environ, PYTHONPATH=os.environ["XBLIP_HF433_PATH"])
  subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "in.npz"),
                  str(tmp_path / "out.npz")], check=True, env=env, capture_output=True)
  got = np.load(tmp_path / "out.npz")
  for i, cfg in enumerate(cfgs):
    want = got[f"seq{i}"]
    assert (want[:, 0] == BOS).all()
    _assert_same(_ours(ours, cfg, emb, mask)[0], want[:, 1:])
