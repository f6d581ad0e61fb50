"""`train_and_evaluate(config, workdir)`: the training loop, read top to bottom.

Sections: mesh, inputs, model and optimizer, init/restore, step functions, loop, evaluation and
summary. Every host runs this same program (SPMD); only process 0 writes logs and summaries.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from xblip_jax import config_utils, sharding
from xblip_jax.eval import candidate_nll, classification, generation, report, scoring
from xblip_jax.eval import tasks as tasks_lib
from xblip_jax.models import build
from xblip_jax.train import checkpoint as ckpt_lib
from xblip_jax.train import inputs as inputs_lib
from xblip_jax.train import metrics as metrics_lib
from xblip_jax.train import model_init, optim
from xblip_jax.train import step as step_lib


def to_global(batch: dict, mesh) -> dict:
  """This host's rows of a training batch as global arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items() if isinstance(v, np.ndarray)}


def to_replicated_rows(batch: dict, mesh) -> dict:
  """An evaluation batch every host holds in full, split over the batch shards it divides."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, np.ndarray):
      spec = sharding.logical_to_spec(("batch",) + (None,) * (v.ndim - 1), shape=v.shape,
                                      mesh_shape=dict(mesh.shape))
      out[k] = jax.make_array_from_callback(v.shape, jax.sharding.NamedSharding(mesh, spec),
                                            lambda idx, v=v: v[idx])
  return out


def evaluate(inputs, mesh, params, rest, eval_loss, generate, *, max_new_tokens: int = 0,
             num_beams: int = 0, workdir: Path | None = None,
             generate_for: Callable | None = None, loss_for: Callable | None = None,
             nll_for: Callable | None = None) -> dict[str, Any]:
  """Every evaluation set scored by its task (`eval/tasks.py`): held-out loss, the task's
  metric, and the loose answer accuracy; writes `<workdir>/eval/<set>.json` (every prediction,
  its references and score) and `<workdir>/eval/results.md`.

  `generate(params, rest, batch, order, decode_cfg)` is `eval.generation.make_task_generate`;
  each set decodes with its task's settings, `max_new_tokens` / `num_beams` (when > 0) capping
  and replacing the preset's (the demo's short answers). `eval_loss` may be None.
  A set whose task has its own LLM prefix (DisCRn, spec 4.7) needs `generate_for(prompt_ids)`
  (and `loss_for(prompt_ids)` when `eval_loss` is given) to build its programs with that
  prefix; without them it is an error rather than scored without the prefix.
  Classification by ranking (`class_rank`) needs `nll_for(prompt_ids)`
  (`eval.candidate_nll.make_candidate_nll`): each row's prediction is the class whose
  candidate text has the least summed NLL; `class_gen` sets generate and take the first class
  named in the output.
  """
  workdir = Path(workdir or inputs.workdir)
  results: dict[str, Any] = {}
  set_tasks: dict[str, Any] = {}
  built: dict[tuple[str, Any], Callable] = {}  # one compiled program per (kind, prompt)

  def program(kind: str, factory: Callable | None, default: Callable | None, eval_set):
    if not eval_set.prefix and kind != "nll":
      return default
    if factory is None:
      need = {"generate": "generate_for", "loss": "loss_for", "nll": "nll_for"}[kind]
      why = "classification by ranking" if kind == "nll" else "its task's prefix"
      raise ValueError(f"evaluation set {eval_set.name!r}: {why} needs evaluate({need}=...)")
    key = (kind, inputs.eval_prompt_ids(eval_set))
    if key not in built:
      built[key] = factory(key[1])
    return built[key]

  for eval_set in inputs.eval_sets():
    task = tasks_lib.for_eval_set(eval_set.name, getattr(eval_set, "task", None))
    cfg = generation.for_tokenizer(task.decode, inputs.llm_tokenizer, max_new_tokens,
                                   num_beams)
    classnames = tuple(getattr(eval_set, "classnames", ()))
    if task.metric in ("class_rank", "class_gen") and not classnames:
      raise ValueError(f"evaluation set {eval_set.name!r}: task {task.name} needs the class "
                       "list (its reader's meta['classnames'])")
    ranked = task.metric == "class_rank"
    set_loss = None if eval_loss is None else program("loss", loss_for, eval_loss, eval_set)
    if ranked:
      set_nll = program("nll", nll_for, None, eval_set)
      candidates = [task.candidates.format(c) for c in classnames]
    else:
      set_generate = program("generate", generate_for, generate, eval_set)
    total, count, preds = 0.0, 0, []
    for order, batch, refs in eval_set.batches:
      dev = to_replicated_rows(batch, mesh)  # once per batch: the loss and generation share it
      if set_loss is not None:
        s, n = set_loss(params, rest, dev, order)
        total, count = total + float(s), count + int(n)
      if ranked:  # every row's own instruction with every candidate; padded rows reuse one
        rows = len(next(iter(batch.values())))
        instructions = [r["instruction"] for r in refs]
        instructions += instructions[-1:] * (rows - len(instructions))
        text = candidate_nll.candidate_batch(inputs.text, instructions, candidates)
        losses = np.asarray(set_nll(params, rest, to_replicated_rows({**batch, **text}, mesh),
                                    order))
        for k, loss_row, ref in zip(classification.rank_candidates(losses), losses, refs):
          preds.append({"prediction": classnames[k], **ref,
                        "candidate_losses": [round(float(v), 4) for v in loss_row]})
        continue
      ids = np.asarray(set_generate(params, rest, dev, order, cfg))
      for row, ref in zip(ids, refs):
        text_out = scoring.postprocess(task, inputs.decode(row))
        if task.metric == "class_gen":
          preds.append({"prediction": classification.class_from_generation(
              text_out, classnames), "generated": text_out, **ref})
        else:
          preds.append({"prediction": text_out, **ref})
    metrics = scoring.score_set(task, preds)
    if set_loss is not None:
      metrics["loss"] = total / max(count, 1)
    results[eval_set.name], set_tasks[eval_set.name] = metrics, task
    report.write_set(workdir, eval_set.name, task, metrics, preds)
  if results:
    report.write_table(workdir, results, set_tasks)
  return results


class _Preemption:
  """SIGTERM sets a flag; the loop saves and stops at the next step boundary."""

  def __init__(self):
    self.flag = False
    # Multi-host: JAX's preemption sync manager owns SIGTERM; a Python handler would hide it.
    self._previous = (signal.signal(signal.SIGTERM, self._handle)
                      if jax.process_count() == 1 else None)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the end of this step")
    self.flag = True

  def reached(self, ckpt: ckpt_lib.Checkpointer, step: int) -> bool:
    if jax.process_count() > 1:  # every host must agree on the step (JAX's preemption sync)
      return ckpt.reached_preemption(step)
    return self.flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str | Path) -> dict[str, Any]:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  seed = int(config.seed)

  # --- Mesh -------------------------------------------------------------------------------
  mesh = sharding.make_mesh(dict(config.get("mesh", None) or {"fsdp": -1}))
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # --- Inputs -----------------------------------------------------------------------------
  inputs = inputs_lib.build_inputs(config, workdir)
  global_batch = int(config.data.batch_size)
  microbatches = int(config.train.get("microbatches", 1))
  if global_batch % (sharding.batch_shards(mesh) * microbatches):
    raise config_utils.ConfigError(
        f"data.batch_size={global_batch} must be a multiple of data x fsdp "
        f"({sharding.batch_shards(mesh)}) x train.microbatches ({microbatches})")

  # --- Model and optimizer ----------------------------------------------------------------
  vocab = inputs.llm_tokenizer.vocab_size
  model = model_init.create_sharded(config, inputs.modalities, vocab, mesh,
                                    weights=inputs_lib.pretrained_weights(config, inputs))
  graphdef, params, rest = model.graphdef, model.params, model.rest
  ocfg = config_utils.build(optim.OptimConfig, config.optim, "optim")
  tx = optim.make_optimizer(ocfg)
  train_rules, _ = model_init.rule_sets(config)
  opt_sh = step_lib.opt_state_shardings(tx, params, mesh, train_rules)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  n_train, n_total = model.counts()
  logging.info("parameters: %d trainable of %d", n_train, n_total)

  # --- Init / restore ---------------------------------------------------------------------
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = jax.device_put(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
                       replicated)
  state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(0),
                                                                               replicated),
           "rng": rng}
  state_sh = {"params": model.param_shardings, "opt_state": opt_sh, "step": replicated,
              "rng": replicated}
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints",
                               max_to_keep=int(config.train.keep_checkpoints))
  history: list[dict] = []
  restored = ckpt_lib.restore_run(ckpt, config, sharding.abstract_with_shardings(state, state_sh))
  if restored is not None:
    state = restored.state
    inputs.set_state(restored.data)
    history = [r for r in restored.meta.get("history", []) if r["step"] <= restored.step]
    logging.info("restored step %d from %s (%s)", restored.step, restored.path, restored.source)
  elif config.get("init_from", ""):
    loaded, missing, unexpected = ckpt_lib.init_params(config.init_from, params,
                                                       model.param_shardings)
    logging.info("init_from: missing %s; unexpected %s", missing, unexpected)
    state["params"] = nnx.merge_state(params, loaded)
  params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
  start = int(state["step"])
  del state

  # --- Step functions ---------------------------------------------------------------------
  prompt = inputs.prompt_ids
  shardings = step_lib.StepShardings(model.param_shardings, opt_sh, model.rest_shardings, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, prompt, shardings=shardings,
                                        microbatches=microbatches)
  loss_for = lambda p: step_lib.make_eval_loss(graphdef, p, shardings)
  eval_loss = loss_for(prompt)
  generate_for = lambda p: generation.make_task_generate(graphdef, p, shardings)
  generate = generate_for(prompt)
  bridge, enc_cfgs = build.xblip_config(config.model, inputs.modalities, vocab)
  sizes = metrics_lib.param_sizes(params, rest)

  @functools.lru_cache(maxsize=None)
  def flops(order):
    return metrics_lib.example_flops(
        sizes, bridge, enc_cfgs, order, media=inputs.media,
        llm_text_len=int(config.text.llm_text_len),
        qformer_len=int(config.text.qformer_max_len), prompt=prompt)

  # --- Loop -------------------------------------------------------------------------------
  num_steps = int(config.train.num_steps)
  log_every, ckpt_every = int(config.train.log_every), int(config.train.checkpoint_every)
  writer = metrics_lib.Writer(workdir, enabled=is_main, total_steps=num_steps,
                              tensorboard=bool(config.train.get("tensorboard", True)))
  writer.truncate_after(workdir / "metrics.jsonl", start)
  meter = metrics_lib.Throughput(mesh.size, metrics_lib.peak_tflops(
      jax.devices()[0].device_kind, float(config.train.get("peak_tflops", 0.0))))
  preemption = _Preemption()
  compiled: set[tuple[str, ...]] = set()
  pending: list[tuple[int, Any]] = []
  preempted, metrics, t_start = False, None, time.perf_counter()
  with jax.set_mesh(mesh):
    for step in range(start + 1, num_steps + 1):
      order, batch = inputs.next_train()
      batch = to_global(batch, mesh)
      key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
      if order not in compiled:  # time compilation apart from the steady state
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
      params, opt_state, metrics = train_step(params, opt_state, rest, batch, key, order)
      if order not in compiled:
        jax.block_until_ready(metrics)
        meter.compiled(time.perf_counter() - t0)
        compiled.add(order)
      else:
        count = flops(order)
        meter.add(count.total * global_batch, global_batch, count.llm_tokens * global_batch)
      pending.append((step, metrics["loss"]))
      preempted = preemption.reached(ckpt, step)
      if step % log_every == 0 or step == start + 1 or step == num_steps or preempted:
        step_lib.check_finite(pending)
        pending.clear()
        row = {"step": step, "modality": "+".join(order), "loss": float(metrics["loss"]),
               "grad_norm": float(metrics["grad_norm"]),
               "lr": float(optim.lavis_schedule(ocfg)(step - 1))}
        history.append(row)
        writer.write(step, {**row, **meter.report(num_steps - step)})
      if step % ckpt_every == 0 or step == num_steps or preempted:
        step_lib.check_finite(pending)  # never checkpoint a state past a non-finite loss
        pending.clear()
        ckpt.save(step, {"params": params, "opt_state": opt_state,
                         "step": jnp.int32(step), "rng": rng},
                  inputs.get_state(), {"history": history}, force=preempted)
      if preempted:
        logging.warning("preempted: saved step %d, stopping", step)
        break
  ckpt.wait()
  preemption.close()
  train_seconds = time.perf_counter() - t_start

  # --- Evaluation and summary -------------------------------------------------------------
  summary = {
      "steps": step if preempted else num_steps, "preempted": preempted,
      "first_loss": history[0]["loss"] if history else None,
      "last_loss": history[-1]["loss"] if history else None,
      "trainable_parameters": n_train, "total_parameters": n_total,
      "mesh": dict(mesh.shape), "compile_seconds": round(meter.compile_s, 2),
      "train_seconds": round(train_seconds, 2), "eval": {}, "data": inputs.stats(),
      "history": history,
  }
  if not preempted:
    with jax.set_mesh(mesh):
      summary["eval"] = evaluate(inputs, mesh, params, rest, eval_loss, generate,
                                 generate_for=generate_for, loss_for=loss_for,
                                 nll_for=lambda p: candidate_nll.make_candidate_nll(
                                     graphdef, p, shardings),
                                 max_new_tokens=int(config.eval.max_new_tokens),
                                 num_beams=int(config.eval.get("num_beams", 0)))
    for name, res in summary["eval"].items():
      logging.info("eval %s: %s", name, res)
    summary["data"] = inputs.stats()
  if is_main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  writer.close()
  ckpt.close()
  return summary
