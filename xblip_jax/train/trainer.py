"""`train_and_evaluate(config, workdir)`: the training loop, read top to bottom.

Sections: inputs, model and optimizer, init/restore, step functions, evaluators, loop, summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from xblip_jax import config_utils
from xblip_jax.eval import answers as answers_lib
from xblip_jax.models.build import build_model
from xblip_jax.models.xblip import trainable
from xblip_jax.train import inputs as inputs_lib
from xblip_jax.train import optim, step as step_lib
from xblip_jax.train.checkpoint import Checkpointer


def _to_device(batch: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items() if isinstance(v, np.ndarray)}


def evaluate(config, inputs, graphdef, params, rest, eval_loss, generate) -> dict[str, Any]:
  """Held-out loss and answer accuracy per evaluation set; writes every prediction."""
  results: dict[str, Any] = {}
  for eval_set in inputs.eval_sets():
    total, count, preds = 0.0, 0, []
    for order, batch, refs in eval_set.batches:
      dev = _to_device(batch)
      s, n = eval_loss(params, rest, dev, order)
      total, count = total + float(s), count + int(n)
      ids = np.asarray(generate(params, rest, dev, order))
      for row, ref in zip(ids, refs):
        preds.append({"prediction": inputs.decode(row), **ref})
    metrics = {"loss": total / max(count, 1), **answers_lib.score(preds)}
    results[eval_set.name] = metrics
    inputs.write_predictions(eval_set.name, preds)
  return results


def train_and_evaluate(config, workdir: str | Path) -> dict[str, Any]:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  seed = int(config.seed)

  # --- Inputs -----------------------------------------------------------------------------
  inputs = inputs_lib.build_inputs(config, workdir)

  # --- Model and optimizer ----------------------------------------------------------------
  model = build_model(config.model, inputs.modalities, seed=seed,
                      llm_vocab_size=inputs.llm_tokenizer.vocab_size)
  inputs_lib.load_pretrained(config, model, inputs)
  graphdef, params, rest = nnx.split(model, trainable, ...)
  ocfg = config_utils.build(optim.OptimConfig, config.optim, "optim")
  tx = optim.make_optimizer(ocfg)
  opt_state = tx.init(params)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  n_total = n_train + sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rest))
  logging.info("parameters: %d trainable of %d", n_train, n_total)

  # --- Init / restore ---------------------------------------------------------------------
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=int(config.train.keep_checkpoints))
  start = 0
  history: list[dict] = []
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore(latest, {"params": params, "opt_state": opt_state})
    params, opt_state = state["params"], state["opt_state"]
    inputs.set_state(meta["data"])
    history = meta.get("history", [])
    start = latest
    logging.info("resumed from step %d", latest)

  # --- Step functions ---------------------------------------------------------------------
  prompt = inputs.prompt_ids
  train_step = step_lib.make_train_step(graphdef, tx, prompt)
  eval_loss = step_lib.make_eval_loss(graphdef, prompt)
  generate = step_lib.make_generate(graphdef, prompt,
                                    max_new_tokens=int(config.eval.max_new_tokens),
                                    eos_id=inputs.llm_tokenizer.eos_id,
                                    pad_id=inputs.llm_tokenizer.pad_id)

  # --- Loop -------------------------------------------------------------------------------
  num_steps = int(config.train.num_steps)
  log_every, ckpt_every = int(config.train.log_every), int(config.train.checkpoint_every)
  rng = jax.random.fold_in(jax.random.key(seed), 1)
  metrics_file = (workdir / "metrics.jsonl").open("a")
  t0, tokens_seen = time.perf_counter(), 0
  for step in range(start + 1, num_steps + 1):
    order, batch = inputs.next_train()
    params, opt_state, metrics = train_step(params, opt_state, rest, _to_device(batch),
                                            jax.random.fold_in(rng, step), order)
    if step % log_every == 0 or step == start + 1 or step == num_steps:
      step_lib.check_finite(metrics, step)
      elapsed = time.perf_counter() - t0
      tokens_seen += int(metrics["tokens"])
      row = {"step": step, "modality": "+".join(order), "loss": float(metrics["loss"]),
             "grad_norm": float(metrics["grad_norm"]),
             "lr": float(optim.lavis_schedule(ocfg)(step - 1)), "elapsed_s": round(elapsed, 2)}
      history.append(row)
      metrics_file.write(json.dumps(row) + "\n")
      metrics_file.flush()
      logging.info("step %d %s loss %.4f", step, row["modality"], row["loss"])
    if step % ckpt_every == 0 or step == num_steps:
      ckpt.save(step, {"params": params, "opt_state": opt_state},
                {"data": inputs.get_state(), "history": history})
  ckpt.wait()
  metrics_file.close()

  # --- Evaluation and summary -------------------------------------------------------------
  eval_results = evaluate(config, inputs, graphdef, params, rest, eval_loss, generate)
  for name, res in eval_results.items():
    logging.info("eval %s: %s", name, res)
  summary = {
      "steps": num_steps,
      "first_loss": history[0]["loss"] if history else None,
      "last_loss": history[-1]["loss"] if history else None,
      "trainable_parameters": n_train,
      "total_parameters": n_total,
      "train_seconds": round(time.perf_counter() - t0, 2),
      "eval": eval_results,
      "data": inputs.stats(),
      "history": history,
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  ckpt.close()
  return summary
