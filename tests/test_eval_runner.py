"""`--mode eval` end to end on a shrunken demo: a short training run evaluates at its end, then
`run_eval` restores its checkpoint and must reproduce the same metrics (same parameters, same
decoding, same scorers) and write the per-set files and the markdown table."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import small_demo_config
from xblip_jax.data import demo
from xblip_jax.eval import candidate_nll, classification
from xblip_jax.eval.runner import run_eval
from xblip_jax.train import restore
from xblip_jax.train import step as step_lib
from xblip_jax.train.trainer import train_and_evaluate


def _config(root):
  c = small_demo_config(root, 1, checkpoint_every=1)
  c.eval.num_beams = 2  # the beam path, kept small
  return c


@pytest.mark.slow  # ~140 s CPU: a training run, its evaluation, a restore and a second one
def test_mode_eval_reproduces_the_training_run_evaluation(tmp_path):
  root = tmp_path / "data"
  demo.write_demo_data(root, seed=0, sizes=demo.DemoSizes(
      image=(8, 4), video=(2, 2), audiocaps=(2, 2), clotho=(2, 2), pc=(8, 4), discrn=(2, 2)))
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
  for name, metric in (("image_qa", "gqa_acc"), ("discrn_image_pc", "discrn_acc")):
    out = json.loads((workdir / "eval" / f"{name}.json").read_text())
    assert out["metrics"] == results[name]
    preds = out["predictions"]
    assert len(preds) == results[name]["num_examples"] > 0
    assert all(p["answers"] and p["score"] in (0.0, 1.0) for p in preds)
    assert results[name][metric] == pytest.approx(sum(p["score"] for p in preds) / len(preds))
  meta = json.loads((workdir / "eval" / "summary.json").read_text())
  assert (meta["source"], meta["step"]) == ("workdir", 1)

  # Ranking: the per-row candidate NLL is the training loss path per row, and the reference
  # answer as a candidate is ranked against other answers by it.
  loaded = restore.load_for_inference(config, workdir)
  order, batch, refs = loaded.inputs.eval_sets()[0].batches[0]
  nll = candidate_nll.make_sequence_nll(loaded.graphdef, loaded.inputs.prompt_ids)
  eval_loss = step_lib.make_eval_loss(loaded.graphdef, loaded.inputs.prompt_ids)
  summed, _ = eval_loss(loaded.params, loaded.rest, batch, order)
  rows = np.asarray(nll(loaded.params, loaded.rest, batch, order))
  assert rows.sum() == pytest.approx(float(summed), rel=1e-4)
  classes = sorted({r["answers"][0] for r in refs} | {"blue", "green"})
  instructions = [r["instruction"] for r in refs]
  instructions += [instructions[-1]] * (len(rows) - len(instructions))
  losses = candidate_nll.candidate_losses(nll, loaded.params, loaded.rest, batch, order,
                                          loaded.inputs.text, instructions, classes)
  assert losses.shape == (len(rows), len(classes)) and np.all(losses > 0)
  # Each (row, candidate) alone through the training loss path (`lm_loss`, batch of one row):
  # the ranking must pick the candidate that path scores lowest.
  alone = np.array([[float(eval_loss(loaded.params, loaded.rest, {
      **jax.tree.map(lambda a, i=i: a[i:i + 1], batch),
      **{k: v[None] for k, v in candidate_nll.candidate_arrays(
          loaded.inputs.text, instructions[i], c).items()}}, order)[0]) for c in classes]
      for i in range(len(rows))])
  np.testing.assert_allclose(losses, alone, rtol=1e-4)
  np.testing.assert_array_equal(classification.rank_candidates(losses), alone.argmin(axis=1))
