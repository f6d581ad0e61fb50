"""Memory planner: compile the training step ahead of time for the configured mesh and report
per-device memory, before any accelerator is rented.

    python -m xblip_jax.main --config configs/vicuna7b/image.py:v5e-64 --workdir DIR \\
        --config.mode=plan

On a CPU host, `main` first asks JAX for `config.plan.devices` simulated devices, so a v5e-64
or 8xH100 mesh compiles here. Nothing is materialised: parameters, optimizer state and the batch
are `jax.ShapeDtypeStruct`s with their shardings, and `jit(...).lower(...).compile()` gives
XLA's `memory_analysis()` for one device. Parameter and optimizer bytes are exact shard sizes;
"activations + temporaries" is XLA's temp allocation (saved activations for the backward pass
and scratch); the total adds the step's arguments and outputs (donated buffers counted once).

XLA:CPU computes bfloat16 matmuls in float32 and materialises float32 copies of the (gathered)
bf16 weights, and schedules for speed rather than memory, so its temp figure is an upper bound.
The plan therefore also gives a backend-independent estimate: exact state bytes, plus the
activations the backward pass keeps (the residuals of `jax.vjp` of the loss, weights excluded,
split over the batch shards), plus a working set of two gathered layers of the largest frozen
tower (FSDP all-gathers one layer while the previous one computes) and one logits gradient.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xblip_jax import config_utils, sharding
from xblip_jax.data import pipeline
from xblip_jax.models import build
from xblip_jax.models.assembly import PromptIds
from xblip_jax.train import metrics as metrics_lib
from xblip_jax.train import model_init, optim
from xblip_jax.train import step as step_lib

GIB = 1024 ** 3
_NO_COMPILE = type("NoCompile", (), dict(argument_size_in_bytes=0, output_size_in_bytes=0,
                                         alias_size_in_bytes=0, temp_size_in_bytes=0))()
# Usable HBM per device (what the runtime reports), by accelerator name.
ACCELERATORS = {"v5e": 16 * GIB, "v5p": 95 * GIB, "h100": 80 * GIB}


def abstract_batch(config, modality: str, batch_size: int, mesh) -> dict[str, Any]:
  """Shapes of a training batch of one modality, sharded like `trainer.to_global`."""
  media = config_utils.build(pipeline.MediaOptions, dict(config.data.media), "data.media")
  text = config.text
  s = media.image_size
  shapes = {
      "image": {"image": ((s, s, 3), jnp.float32)},
      "video": {"video": ((media.n_frms, s, s, 3), jnp.float32)},
      "audio": {"audio": ((media.num_clips, media.frames_per_clip, 128), jnp.float32),
                "audio_clip_mask": ((media.num_clips,), jnp.bool_),
                "audio_padding_mask": ((media.num_clips, media.frames_per_clip), jnp.bool_)},
      "pc": {"pc": ((media.npoints, 3), jnp.float32)},
  }[modality]
  for key in ("llm_text_ids", "llm_text_mask", "llm_text_labels"):
    shapes[key] = ((int(text.llm_text_len),), jnp.int32)
  for key in ("qformer_ids", "qformer_mask"):
    shapes[key] = ((int(text.qformer_max_len),), jnp.int32)
  return {k: jax.ShapeDtypeStruct((batch_size,) + shape, dtype,
                                  sharding=sharding.batch_sharding(mesh, len(shape) + 1))
          for k, (shape, dtype) in shapes.items()}


def _prompt(modality: str) -> PromptIds:
  """Cue ids of the reference's lengths (`</s>` + 2 tokens); only lengths matter here."""
  return PromptIds(cues=((modality, (2, 10, 11)),), clean_tokenization=True)


def example_flops(config, modality: str, params, rest) -> metrics_lib.FlopCount:
  """Analytic training FLOPs of one `modality` example of `config` (`_prompt`'s cue lengths)."""
  bridge, enc_cfgs = build.xblip_config(config.model, (modality,))
  media = config_utils.build(pipeline.MediaOptions, dict(config.data.media), "data.media")
  return metrics_lib.example_flops(
      metrics_lib.param_sizes(params, rest), bridge, enc_cfgs, (modality,), media=media,
      llm_text_len=int(config.text.llm_text_len), qformer_len=int(config.text.qformer_max_len),
      prompt=_prompt(modality))


def plan(config) -> dict[str, Any]:
  """Per-device memory of one training step of `config.plan.modality` on `config.mesh`."""
  modality = config.plan.get("modality") or config.data.modalities[0]
  devices = int(config.plan.devices) or len(jax.devices())
  if len(jax.devices()) < devices:
    raise RuntimeError(f"{devices} devices needed, {len(jax.devices())} present")
  mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:devices])
  batch_size = int(config.data.batch_size)
  microbatches = int(config.train.get("microbatches", 1))
  if batch_size % (sharding.batch_shards(mesh) * microbatches):
    raise config_utils.ConfigError(f"batch {batch_size} does not split over data x fsdp = "
                                   f"{sharding.batch_shards(mesh)} x {microbatches} microbatches")
  t0 = time.perf_counter()
  graphdef, params, rest, p_sh, r_sh = model_init.abstract_state(config, (modality,), None, mesh)
  tx = optim.make_optimizer(config_utils.build(optim.OptimConfig, config.optim, "optim"))
  train_rules, _ = model_init.rule_sets(config)
  opt_sh = step_lib.opt_state_shardings(tx, params, mesh, train_rules)
  opt_state = jax.eval_shape(tx.init, params)
  shardings = step_lib.StepShardings(p_sh, opt_sh, r_sh, mesh)
  prompt = _prompt(modality)
  step = step_lib.make_train_step(graphdef, tx, prompt, shardings=shardings,
                                  microbatches=microbatches)
  batch = abstract_batch(config, modality, batch_size, mesh)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shardings.replicated)
  compile_it = bool(config.plan.get("compile", True))
  t1 = time.perf_counter()
  with jax.set_mesh(mesh):
    if compile_it:
      lowered = step.lower(sharding.abstract_with_shardings(params, p_sh),
                           sharding.abstract_with_shardings(opt_state, opt_sh),
                           sharding.abstract_with_shardings(rest, r_sh), batch, key,
                           (modality,))
      t1 = time.perf_counter()
      mem = lowered.compile().memory_analysis()
    else:  # the estimate only (minutes faster on a full-size model)
      mem = _NO_COMPILE
  t2 = time.perf_counter()
  est = _estimate(config, graphdef, prompt, params, rest, batch, modality, mesh, microbatches)
  flops = example_flops(config, modality, params, rest)
  out = {
      "modality": modality, "devices": devices, "mesh": dict(mesh.shape),
      "global_batch": batch_size, "microbatches": microbatches,
      "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
      "frozen_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(rest))),
      "bytes": {
          "trainable_params": sharding.sharded_bytes(params, p_sh),
          "frozen_params": sharding.sharded_bytes(rest, r_sh),
          "optimizer_state": sharding.sharded_bytes(opt_state, opt_sh),
          "batch": sum(sharding.sharded_bytes(v, v.sharding) for v in batch.values()),
          "activations_and_temporaries": int(mem.temp_size_in_bytes),
          "total": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      },
      "estimate": est,
      "xla": {"argument": int(mem.argument_size_in_bytes),
              "output": int(mem.output_size_in_bytes), "alias": int(mem.alias_size_in_bytes),
              "temp": int(mem.temp_size_in_bytes)},
      "flops_per_example": {"encoders": flops.encoders, "qformer": flops.qformer,
                            "llm": flops.llm, "total": flops.total},
      "llm_tokens_per_example": flops.llm_tokens,
      "seconds": {"abstract": round(t1 - t0, 1), "compile": round(t2 - t1, 1)},
  }
  b = out["bytes"]
  est["total"] = (b["trainable_params"] * 2 + b["frozen_params"] + b["optimizer_state"]
                  + b["batch"] + est["saved_activations"] + est["gathered_layers"]
                  + est["logits_grad"])  # x2: parameters and their float32 gradients
  out["fits"] = {name: b["total"] <= hbm for name, hbm in ACCELERATORS.items()}
  out["fits_estimate"] = {name: est["total"] <= hbm for name, hbm in ACCELERATORS.items()}
  return out


def _estimate(config, graphdef, prompt, params, rest, batch, modality, mesh, microbatches
              ) -> dict[str, int]:
  """Backend-independent activation terms of one device (see the module docstring)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def residuals(p, r, b):
    def loss(p):
      model = nnx.merge(graphdef, p, r)
      return step_lib.lm_loss(model, b, (modality,), prompt, deterministic=False,
                              rngs=nnx.Rngs(dropout=0))[0]
    return jax.vjp(loss, p)[1]

  micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] // microbatches,)
                                                      + x.shape[1:], x.dtype), batch)
  saved = jax.eval_shape(residuals, params, rest, micro)
  weights = {(tuple(x.shape), x.dtype) for x in jax.tree.leaves((params, rest))}
  act = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(saved)
            if (tuple(x.shape), x.dtype) not in weights)
  shards = sharding.batch_shards(mesh)
  sizes = metrics_lib.param_sizes(rest)
  layer = lambda prefix: sum(v for k, v in sizes.items() if k.startswith(prefix))
  itemsize = jnp.dtype(build.precision(config.model.precision.llm, "llm").param_dtype).itemsize
  biggest = max(layer("llm/layers/0/"), layer(f"encoders/{modality}/blocks/0/"))
  rows = int(batch["llm_text_ids"].shape[0]) // microbatches // shards
  # The training loss runs the LM head on the text block's labelled rows only
  # (`assembly.text_lm_loss`): at most the text length per row, not the whole sequence.
  text = int(batch["llm_text_ids"].shape[1])
  vocab = build.xblip_config(config.model, (modality,))[0].llm.vocab_size
  return {"saved_activations": act // shards, "gathered_layers": 2 * biggest * itemsize,
          "logits_grad": rows * text * vocab * 4}


def table(result: dict[str, Any]) -> str:
  """A human-readable summary of `plan`'s result."""
  b = result["bytes"]
  gib = lambda n: f"{n / GIB:8.3f} GiB"
  rows = [f"modality {result['modality']}  mesh {result['mesh']}  global batch "
          f"{result['global_batch']} ({result['microbatches']} microbatch(es))",
          f"parameters: {result['trainable_params']:,} trainable, "
          f"{result['frozen_params']:,} frozen",
          "per-device memory:"]
  rows += [f"  {name:28s}{gib(b[name])}" for name in (
      "trainable_params", "frozen_params", "optimizer_state", "batch",
      "activations_and_temporaries", "total")]
  e = result["estimate"]
  rows.append("XLA:CPU bound " + ", ".join(
      f"{k} ({ACCELERATORS[k] // GIB} GiB): {'fits' if v else 'NO'}"
      for k, v in result["fits"].items()))
  rows.append(f"estimate (TPU/GPU): saved activations {gib(e['saved_activations'])}, "
              f"gathered layers {gib(e['gathered_layers'])}, logits grad {gib(e['logits_grad'])}"
              f", total {gib(e['total'])}")
  rows.append("estimate " + ", ".join(
      f"{k}: {'fits' if v else 'NO'}" for k, v in result["fits_estimate"].items()))
  f = result["flops_per_example"]
  rows.append(f"training FLOPs per example: {f['total']:.3e} (encoders {f['encoders']:.2e}, "
              f"Q-Former {f['qformer']:.2e}, LLM {f['llm']:.2e}); "
              f"{result['llm_tokens_per_example']} LLM tokens")
  rows.append(f"abstract build {result['seconds']['abstract']} s, "
              f"compile {result['seconds']['compile']} s")
  return "\n".join(rows)
