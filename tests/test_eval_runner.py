"""`--mode eval` end to end on a shrunken demo: a short training run evaluates at its end, then
`run_eval` restores its checkpoint and must reproduce the same metrics (same parameters, same
decoding, same scorers) and write the per-set files and the markdown table. The demo's
ModelNet40-layout set is scored by likelihood ranking, the DisCRn set's loss with its prefix."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import small_demo_config
from xblip_jax.data import demo, demo_classification
from xblip_jax.eval import candidate_nll, classification, tasks
from xblip_jax.eval.runner import run_eval
from xblip_jax.train import restore
from xblip_jax.train import step as step_lib
from xblip_jax.train.trainer import evaluate, train_and_evaluate


def _config(root):
  c = small_demo_config(root, 1, checkpoint_every=1)
  c.eval.num_beams = 2  # the beam path, kept small
  c.data.eval_datasets = tuple(c.data.eval_datasets) + ("pc_cls",)
  return c


def _add_pc_cls(root, n=(4, 6)):
  """The ModelNet40-layout demo set added to a written demo (until `write_demo_data` does)."""
  manifest = demo.load_manifest(root)
  for s, split in enumerate(demo.SPLITS):
    demo_classification.modelnet40_split(root, split, n[s], np.random.default_rng([0, 9, s]),
                                         manifest)
  (root / "manifest.json").write_text(json.dumps(
      {name: {split: dataclasses.asdict(e) for split, e in splits.items()}
       for name, splits in manifest.items()}))


@pytest.mark.slow  # ~250 s CPU: a training run, its evaluation, a restore and a second one
def test_mode_eval_reproduces_the_training_run_evaluation(tmp_path, monkeypatch):
  monkeypatch.setenv("XBLIP_CACHE_DIR", str(tmp_path / "cache"))
  root = tmp_path / "data"
  demo.write_demo_data(root, seed=0, sizes=demo.DemoSizes(
      image=(8, 4), video=(2, 2), audiocaps=(2, 2), clotho=(2, 2), pc=(8, 4), discrn=(2, 2)))
  if "pc_cls" not in demo.load_manifest(root):
    _add_pc_cls(root)
  config = _config(root)
  with pytest.raises(FileNotFoundError, match="init_from"):
    run_eval(config, tmp_path / "untrained")
  workdir = tmp_path / "run"
  summary = train_and_evaluate(config, workdir)
  trained_table = (workdir / "eval" / "results.md").read_text()
  results = run_eval(config, workdir)
  assert results == summary["eval"]
  assert (workdir / "eval" / "results.md").read_text() == trained_table
  assert "| image_qa | gqa | gqa_acc |" in trained_table
  assert "| discrn_image_pc | discrn_image_3d | discrn_acc |" in trained_table
  assert "| pc_cls | modelnet40 | class_acc |" in trained_table
  for name, metric in (("image_qa", "gqa_acc"), ("discrn_image_pc", "discrn_acc"),
                       ("pc_cls", "class_acc")):
    out = json.loads((workdir / "eval" / f"{name}.json").read_text())
    assert out["metrics"] == results[name]
    preds = out["predictions"]
    assert len(preds) == results[name]["num_examples"] > 0
    assert all(p["answers"] and p["score"] in (0.0, 1.0) for p in preds)
    assert results[name][metric] == pytest.approx(sum(p["score"] for p in preds) / len(preds))
  meta = json.loads((workdir / "eval" / "summary.json").read_text())
  assert (meta["source"], meta["step"]) == ("workdir", 1)

  loaded = restore.load_for_inference(config, workdir)
  inputs = loaded.inputs
  sets = {s.name: s for s in inputs.eval_sets()}
  eval_loss = step_lib.make_eval_loss(loaded.graphdef, inputs.prompt_ids)

  # A prefixed set's held-out loss is the loss with its task's prefix, not the run's prompt
  # (the demo's DisCRn set takes the demo's own prompts: here it gets the DisCRn prefix).
  discrn = dataclasses.replace(sets["discrn_image_pc"], prefix=tasks.DISCRN_PREFIX)
  monkeypatch.setattr(inputs, "eval_sets", lambda: [discrn])
  loss_for = lambda p: step_lib.make_eval_loss(loaded.graphdef, p)
  eos = inputs.llm_tokenizer.eos_id
  no_answer = lambda params, rest, batch, order, cfg: np.full((len(batch["prompt_ids"]), 1), eos)
  prefixed = evaluate(inputs, loaded.mesh, loaded.params, loaded.rest, eval_loss, no_answer,
                      generate_for=lambda p: no_answer, loss_for=loss_for,
                      workdir=tmp_path / "prefixed")["discrn_image_pc"]["loss"]
  sums = lambda fn: np.sum([np.asarray(fn(loaded.params, loaded.rest, b, o), np.float64)
                            for o, b, _ in discrn.batches], axis=0)
  (total, count) = sums(loss_for(inputs.eval_prompt_ids(discrn)))
  assert prefixed == pytest.approx(total / count, rel=1e-5)
  assert abs(prefixed - sums(eval_loss)[0] / count) > 1e-4

  # Ranking: each (row, class) NLL is that pair alone through the training loss path
  # (`make_eval_loss` on a one-row batch); the written prediction is its argmin.
  pc_cls = sets["pc_cls"]
  task = tasks.for_eval_set("pc_cls")
  assert task.metric == "class_rank"
  candidates = [task.candidates.format(c) for c in pc_cls.classnames]
  order, batch, refs = pc_cls.batches[0]
  instructions = [r["instruction"] for r in refs]
  nll = candidate_nll.make_candidate_nll(loaded.graphdef, inputs.prompt_ids)
  losses = candidate_nll.candidate_losses(nll, loaded.params, loaded.rest, batch, order,
                                          inputs.text, instructions + instructions[-1:] * (
                                              len(batch["pc"]) - len(refs)), candidates)
  alone = np.array([[float(eval_loss(loaded.params, loaded.rest, {
      **jax.tree.map(lambda a, i=i: a[i:i + 1], batch),
      **{k: v[None] for k, v in candidate_nll.candidate_arrays(
          inputs.text, instructions[i], c).items()}}, order)[0]) for c in candidates]
      for i in range(len(refs))])
  np.testing.assert_allclose(losses[:len(refs)], alone, rtol=1e-4)
  written = json.loads((workdir / "eval" / "pc_cls.json").read_text())["predictions"]
  assert [p["prediction"] for p in written[:len(refs)]] == [
      pc_cls.classnames[k] for k in classification.rank_candidates(alone)]
  np.testing.assert_allclose([p["candidate_losses"] for p in written[:len(refs)]], alone,
                             rtol=1e-3, atol=1e-3)
