"""Sharding checks on 8 simulated CPU devices, run by `tests/test_sharded.py` in a subprocess
(the device count must be fixed before JAX starts, and conftest has already started it).

Prints one JSON object of measurements; the test asserts on them.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))

import common  # noqa: E402  pylint: disable=wrong-import-position
import demo as demo_config  # noqa: E402  pylint: disable=wrong-import-position

from xblip_jax import config_utils, sharding  # noqa: E402
from xblip_jax.models.assembly import PromptIds  # noqa: E402
from xblip_jax.train import model_init, optim  # noqa: E402
from xblip_jax.train import step as step_lib  # noqa: E402

B = 8


def _config(remat: bool = False):
  c = demo_config.get_config()
  c.model.llm.remat_policy = "full" if remat else "none"
  c.model.encoders.image.remat = remat
  c.model.llm_init = "random"
  c.model.qformer.hidden_dropout = 0.0
  return c


def _batch(seed: int, nan: bool = False) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 300, (B, 48)).astype(np.int32)
  mask = np.ones((B, 48), np.int32)
  mask[:, 40:] = 0
  labels = np.where(np.arange(48) >= 20, ids, -100).astype(np.int32)
  labels[:, 40:] = -100
  image = rng.normal(size=(B, 48, 48, 3)).astype(np.float32)
  if nan:
    image[0, 0, 0, 0] = np.nan
  return {"image": image, "llm_text_ids": ids, "llm_text_mask": mask,
          "llm_text_labels": labels.astype(np.int32),
          "qformer_ids": rng.integers(1000, 2000, (B, 24)).astype(np.int32),
          "qformer_mask": np.ones((B, 24), np.int32)}


def _run(mesh, microbatches: int, steps: int = 2, nan_step: bool = False, remat: bool = False):
  config = _config(remat)
  model = model_init.create_sharded(config, ("image",), 384, mesh)
  # Plain SGD for the comparisons: AdamW's m / sqrt(v) turns rounding noise in near-zero
  # gradients into full-size updates, which would hide what is compared (the gradients).
  tx = optax.sgd(0.1)
  rules, _ = model_init.rule_sets(config)
  opt_sh = step_lib.opt_state_shardings(tx, model.params, mesh, rules)
  shardings = step_lib.StepShardings(model.param_shardings, opt_sh, model.rest_shardings, mesh)
  prompt = PromptIds(cues=(("image", (2, 7, 8)),))
  train = step_lib.make_train_step(model.graphdef, tx, prompt, shardings=shardings,
                                   microbatches=microbatches)
  with jax.set_mesh(mesh):
    params = model.params
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    rest_before = jax.tree.map(np.asarray, model.rest)
    params0 = jax.tree.map(np.asarray, params)
    losses = []
    for i in range(steps + nan_step):
      if i == steps:
        final = jax.tree.map(np.asarray, params)
      batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
               for k, v in _batch(i, nan=i == steps).items()}
      params, opt_state, metrics = train(params, opt_state, model.rest, batch,
                                         jax.random.key(i), ("image",))
      losses.append(metrics["loss"])
  final = final if nan_step else jax.tree.map(np.asarray, params)
  return dict(params=final, params0=params0, losses=losses, rest_before=rest_before,
              rest_after=jax.tree.map(np.asarray, model.rest), model=model,
              grad_norm=float(metrics["grad_norm"]))


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _flat_paths(state) -> set[str]:
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def main() -> None:
  out: dict = {"devices": len(jax.devices())}
  single = _run(sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]), 1)
  sharded = _run(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), 1, nan_step=True)
  micro = _run(sharding.make_mesh({"fsdp": 4, "tensor": 2}), 2)
  remat = _run(sharding.make_mesh({"fsdp": 8}), 1, remat=True)
  out["losses"] = {"single": [float(x) for x in single["losses"]],
                   "sharded": [float(x) for x in sharded["losses"][:2]],
                   "micro": [float(x) for x in micro["losses"]],
                   "remat": [float(x) for x in remat["losses"]]}
  out["param_diff_sharded"] = _max_diff(single["params"], sharded["params"])
  out["param_diff_micro"] = _max_diff(single["params"], micro["params"])
  out["param_diff_remat"] = _max_diff(single["params"], remat["params"])
  out["param_update"] = _max_diff(single["params"], single["params0"])
  out["frozen_diff"] = _max_diff(sharded["rest_before"], sharded["rest_after"])
  out["grad_norm"] = {k: r["grad_norm"] for k, r in (("single", single), ("micro", micro),
                                                       ("remat", remat))}
  # The run's AdamW state: moments only for trainable parameters.
  model = sharded["model"]
  trainable = _flat_paths(model.params)
  tx = optim.make_optimizer(config_utils.build(optim.OptimConfig, _config().optim, "optim"))
  moments = [("/".join(map(str, p)), v) for p, v in
             jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, model.params))[0]]
  out["opt_leaves"] = len(moments)
  out["trainable_leaves"] = len(trainable)
  out["opt_frozen_leaves"] = sum(1 for p in _flat_paths(model.rest)
                                 for k, _ in moments if k.endswith(p.replace("/", "']['")))
  out["opt_state_bytes"] = sum(int(np.prod(v.shape)) for _, v in moments)
  out["trainable_elems"] = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(model.params))
  # Sharded model leaves really are split: fraction of frozen bytes on one device.
  frozen_total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(model.rest))
  out["frozen_device_fraction"] = (sharding.sharded_bytes(model.rest, model.rest_shardings)
                                   / frozen_total)
  # Full-size abstract check: no large parameter replicated (7B image bridge, 8 devices).
  cfg = common.get_config("7b", "image", "h100x8")
  mesh = sharding.make_mesh({"fsdp": 8})
  _, params, rest, _, _ = model_init.abstract_state(cfg, ("image",), None, mesh)
  train_rules, frozen_rules = model_init.rule_sets(cfg)
  out["param_count_7b_image"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  for name, sizes in (("fsdp8", {"fsdp": 8}), ("fsdp4_tp2", {"fsdp": 4, "tensor": 2})):
    mesh = sharding.make_mesh(sizes)
    replicated = []
    for state, rules in ((params, train_rules), (rest, frozen_rules)):
      sh = sharding.named_shardings(state, mesh, rules)
      for (path, var), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(sh)):
        if int(np.prod(var.get_value().shape)) >= 1 << 20 and s.is_fully_replicated:
          replicated.append(f"{'/'.join(map(str, path))} {var.get_value().shape}")
    out[f"replicated_large_{name}"] = replicated
  # NaN in the input (third step of the sharded run): the guard names the step.
  try:
    step_lib.check_finite(list(enumerate(sharded["losses"], start=1)))
    out["nan_error"] = None
  except step_lib.NonFiniteLossError as e:
    out["nan_error"] = str(e)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
