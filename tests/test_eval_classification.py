"""Classification evaluation wired into the trainer's `evaluate`, and per-set prompts.

- `make_candidate_nll` (one program: encoders once, the LLM once per candidate) gives each
  (row, candidate) the summed loss that the training loss path gives that pair alone;
- `evaluate` ranks a `class_rank` set's class names formatted into the task's candidate
  template (BOS dropped, no EOS, labels on the candidate only), maps a `class_gen` set's
  generated text to a class, writes the predictions and accuracy;
- the held-out loss of a set whose task has an LLM prefix (DisCRn) uses the prefix, as its
  generation does.
"""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xblip_jax import sharding
from xblip_jax.data import text as text_lib
from xblip_jax.data.demo_tokenizer import train_demo_tokenizer
from xblip_jax.data.tokenizers import LlmTokenizer
from xblip_jax.eval import candidate_nll, tasks
from xblip_jax.models import assembly
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip, trainable
from xblip_jax.train import step as step_lib
from xblip_jax.train.inputs import EvalSet
from xblip_jax.train.trainer import evaluate

B, C, L, WIDTH, NQ = 3, 4, 12, 16, 3
PROMPT = assembly.PromptIds(prefix=(1, 40, 41), cues=(("pc", (1, 30, 31)),))


def _tiny_model():
  cfg = XBlipConfig(
      encoder_widths=(("pc", WIDTH),),
      qformer=QFormerConfig.tiny(encoder_width=WIDTH, num_layers=1, num_query_tokens=NQ,
                                 hidden_size=32, intermediate_size=64, hidden_dropout=0.0,
                                 attention_dropout=0.0),
      llm=LlamaConfig.tiny(vocab_size=97, num_layers=2), num_query_tokens=NQ)
  return nnx.split(XInstructBlip(cfg, rngs=nnx.Rngs(0)), trainable, ...)


def test_candidate_nll_is_the_training_loss_of_each_pair_alone():
  graphdef, params, rest = _tiny_model()
  rng = np.random.default_rng(0)
  batch = {"pc_features": rng.standard_normal((B, 1, 5, WIDTH)).astype(np.float32),
           "qformer_ids": rng.integers(100, 900, (B, 4)).astype(np.int32),
           "qformer_mask": np.ones((B, 4), np.int32)}
  # Right-padded [instruction][candidate] rows, labels on the candidate (lengths differ).
  n_ins, n_cand = rng.integers(2, 5, (B, C)), rng.integers(1, 5, (B, C))
  ids = rng.integers(40, 97, (B, C, L)).astype(np.int32)
  pos = np.arange(L)
  mask = (pos < (n_ins + n_cand)[..., None]).astype(np.int32)
  labels = np.where((pos >= n_ins[..., None]) & (mask == 1), ids, text_lib.IGNORE)
  cand = {"cand_llm_text_ids": ids * mask, "cand_llm_text_mask": mask,
          "cand_llm_text_labels": labels.astype(np.int32)}
  nll = candidate_nll.make_candidate_nll(graphdef, PROMPT)
  got = np.asarray(nll(params, rest, {**batch, **cand}, ("pc",)))
  assert got.shape == (B, C) and np.all(got > 0)
  eval_loss = step_lib.make_eval_loss(graphdef, PROMPT)
  alone = np.array([[float(eval_loss(params, rest, {
      **{k: v[i:i + 1] for k, v in batch.items()},
      **{k[len(candidate_nll.CAND):]: v[i:i + 1, c] for k, v in cand.items()}}, ("pc",))[0])
      for c in range(C)] for i in range(B)])
  np.testing.assert_allclose(got, alone, rtol=2e-5)
  # Other candidates of the same shape reuse the program.
  nll(params, rest, {**batch, **{k: v[:, ::-1] for k, v in cand.items()}}, ("pc",))
  assert nll._cache_size() == 1


# --- `evaluate` with stand-in programs ------------------------------------------------------
CLASSES = ("fast high beeps", "slow low beeps", "cube")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  texts = [f"an audio of {c}" for c in CLASSES] + ["describe the audio", "it is a cube",
                                                    "question: which one answer:", "a b c d"]
  return LlmTokenizer.from_file(train_demo_tokenizer(texts, path, vocab_size=320))


def _inputs(tok, tmp_path, sets, rows=4):
  cfg = text_lib.TextConfig(llm_text_len=24, max_txt_len=16)
  encoder = text_lib.TextEncoder(tok, None, cfg)

  def eval_prompt_ids(s):
    return PROMPT if not s.prefix else dataclasses.replace(
        PROMPT, prefix=tuple(tok.encode(s.prefix, add_bos=True)))

  def decode(ids):
    ids = list(ids)
    return tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids).strip()

  return types.SimpleNamespace(eval_sets=lambda: sets, llm_tokenizer=tok, text=encoder,
                               workdir=tmp_path, prompt_ids=PROMPT, decode=decode,
                               eval_prompt_ids=eval_prompt_ids)


def _set(name, task, answers, rows=4, **kw):
  refs = [{"id": str(i), "instruction": "describe the audio", "answers": [a]}
          for i, a in enumerate(answers)]
  batch = {"row": np.arange(rows, dtype=np.int32), "prompt_ids": np.zeros((rows, 2), np.int32)}
  return EvalSet(name, [(("audio",), batch, refs)], task=task, classnames=CLASSES, **kw)


def _ranker(tok, built, prefer):
  """A stand-in `nll_for`: the loss of a candidate is 0 when its supervised tokens spell
  `prefer[row]` in the task's template, else 1; it checks the candidate rows' layout."""
  template = tasks.TASKS["esc50"].candidates

  def nll_for(prompt):
    built.append(prompt)

    def nll(params, rest, batch, order):
      ids, labels = batch["cand_llm_text_ids"], batch["cand_llm_text_labels"]
      assert ids.shape[:2] == (4, len(CLASSES))
      out = np.ones(ids.shape[:2], np.float32)
      for i, c in np.ndindex(*out.shape):
        sup = labels[i, c][labels[i, c] != text_lib.IGNORE]
        assert tok.eos_id not in sup.tolist() and tok.bos_id not in sup.tolist()
        assert tok.decode(sup.tolist()) == template.format(CLASSES[c])
        out[i, c] = 0.0 if CLASSES[c] == prefer[min(i, len(prefer) - 1)] else 1.0
      return jnp.asarray(out)
    return nll
  return nll_for


def test_class_rank_set_is_ranked_and_written(tok, tmp_path):
  answers = ["slow low beeps", "fast high beeps", "cube"]
  inputs = _inputs(tok, tmp_path, [_set("audio_cls", None, answers)])
  built = []
  nll_for = _ranker(tok, built, prefer=["slow low beeps", "cube", "cube"])
  mesh = sharding.make_mesh({"fsdp": -1})
  with pytest.raises(ValueError, match="nll_for"):
    evaluate(inputs, mesh, None, None, None, None)
  results = evaluate(inputs, mesh, None, None, None, None, nll_for=nll_for)
  assert built == [PROMPT]
  assert results["audio_cls"]["class_acc"] == pytest.approx(2 / 3)
  out = json.loads((tmp_path / "eval" / "audio_cls.json").read_text())
  assert out["task"] == "esc50"
  preds = out["predictions"]
  assert [p["prediction"] for p in preds] == ["slow low beeps", "cube", "cube"]
  assert [p["score"] for p in preds] == [1.0, 0.0, 1.0]
  assert preds[0]["candidate_losses"] == [1.0, 0.0, 1.0]
  assert "| audio_cls | esc50 | class_acc | 0.6667 | 3 |" in (
      tmp_path / "eval" / "results.md").read_text()


def test_class_gen_set_takes_the_first_class_in_the_generated_text(tok, tmp_path):
  inputs = _inputs(tok, tmp_path, [_set("gen", "esc50_gen", ["cube", "slow low beeps"])])
  said = tok.encode("it is a cube", add_bos=False) + [tok.eos_id]

  def generate(params, rest, batch, order, cfg):
    return np.tile(np.array(said), (batch["prompt_ids"].shape[0], 1))

  results = evaluate(inputs, sharding.make_mesh({"fsdp": -1}), None, None, None, generate)
  preds = json.loads((tmp_path / "eval" / "gen.json").read_text())["predictions"]
  assert [p["prediction"] for p in preds] == ["cube", "cube"]
  assert preds[0]["generated"] == "it is a cube"
  # A multi-word class can never match one word of the output (as the reference).
  assert results["gen"]["class_acc"] == 0.5


def test_held_out_loss_of_a_prefixed_set_uses_its_prefix(tok, tmp_path):
  prefix = tasks.DISCRN_PREFIX
  plain = _set("plain", "esc50_gen", ["cube"])
  prefixed = _set("pref", "esc50_gen", ["cube"], prefix=prefix)
  inputs = _inputs(tok, tmp_path, [plain, prefixed])
  want = inputs.eval_prompt_ids(prefixed)
  assert want != PROMPT

  def loss_with(prompt):  # a stand-in whose value tells which prompt it was built with
    value = float(len(prompt.prefix))
    return lambda params, rest, batch, order: (value * 2, 2)

  built = []

  def loss_for(prompt):
    built.append(prompt)
    return loss_with(prompt)

  def generate(params, rest, batch, order, cfg):
    return np.full((batch["prompt_ids"].shape[0], 1), tok.eos_id)

  mesh = sharding.make_mesh({"fsdp": -1})
  with pytest.raises(ValueError, match="prefix needs evaluate\\(loss_for"):
    evaluate(inputs, mesh, None, None, loss_with(PROMPT), generate,
             generate_for=lambda p: generate)
  results = evaluate(inputs, mesh, None, None, loss_with(PROMPT), generate,
                     generate_for=lambda p: generate, loss_for=loss_for)
  assert built == [want]
  assert results["plain"]["loss"] == len(PROMPT.prefix)
  assert results["pref"]["loss"] == len(want.prefix)
