"""`--mode eval`: score a trained model on every configured evaluation set.

Restores the workdir's latest checkpoint (else `config.init_from`) through
`train.restore.load_for_inference` and runs the trainer's own `evaluate`, so `--mode eval` and
the end of a training run write the same files from the same code: `<workdir>/eval/<set>.json`
and `<workdir>/eval/results.md` (also printed), plus `<workdir>/eval/summary.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from absl import logging

from xblip_jax.eval import candidate_nll, generation
from xblip_jax.train import restore
from xblip_jax.train import step as step_lib
from xblip_jax.train.trainer import evaluate


def run_eval(config, workdir: str | Path) -> dict[str, Any]:
  """Metrics per evaluation set (`{set: {metric: value}}`)."""
  workdir = Path(workdir)
  loaded = restore.load_for_inference(config, workdir)
  model, inputs, mesh = loaded.model, loaded.inputs, loaded.mesh
  shardings = step_lib.StepShardings(model.param_shardings, None, model.rest_shardings, mesh)
  prompt = inputs.prompt_ids
  loss_for = lambda p: step_lib.make_eval_loss(loaded.graphdef, p, shardings)
  generate_for = lambda p: generation.make_task_generate(loaded.graphdef, p, shardings)
  nll_for = lambda p: candidate_nll.make_candidate_nll(loaded.graphdef, p, shardings)
  with jax.set_mesh(mesh):
    results = evaluate(inputs, mesh, loaded.params, loaded.rest, loss_for(prompt),
                       generate_for(prompt), generate_for=generate_for, loss_for=loss_for,
                       nll_for=nll_for,
                       max_new_tokens=int(config.eval.max_new_tokens),
                       num_beams=int(config.eval.get("num_beams", 0)), workdir=workdir)
  if jax.process_index() == 0:
    (workdir / "eval" / "summary.json").write_text(json.dumps(
        {"source": loaded.source, "path": loaded.path, "step": loaded.step, "eval": results},
        indent=2))
    table = workdir / "eval" / "results.md"
    if table.exists():
      print(table.read_text())
  logging.info("eval from %s (step %s): %s", loaded.path, loaded.step, results)
  return results
