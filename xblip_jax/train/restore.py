"""`load_for_inference(config, workdir)`: a trained model, ready for evaluation or generation.

`--mode eval` and `--mode generate` both need the same things the trainer builds (mesh,
tokenizers and inputs, the sharded model with its pretrained frozen towers) plus the trained
bridge parameters, but no optimizer: only `state/params` of a checkpoint is read. Source order
as `checkpoint.restore_run`: the workdir's latest complete step, then `config.resume`, then
`config.init_from` (a step folder or an Orbax parameter tree). With none, or with an
`init_from` that matches no trainable parameter, evaluating would score a random bridge, so it
is an error. The training pipeline is not built (`Inputs(train=False)`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from absl import logging
from flax import nnx

from xblip_jax import sharding
from xblip_jax.train import checkpoint as ckpt_lib
from xblip_jax.train import inputs as inputs_lib
from xblip_jax.train import model_init


@dataclasses.dataclass
class Loaded:
  """A restored model and its inputs.

  Attributes:
    inputs: the run's `train.inputs.Inputs` (tokenizers, prompt ids, evaluation sets).
    model: the `ShardedModel` (its `params` are the initial ones; use `params` below).
    graphdef, params, rest: `nnx.merge(graphdef, params, rest)` is the trained model.
    mesh: the device mesh the parameters live on.
    source: "workdir", "resume" or "init_from"; path: what was read; step: its step (None for a tree).
  """

  inputs: Any
  model: model_init.ShardedModel
  graphdef: Any
  params: nnx.State
  rest: nnx.State
  mesh: jax.sharding.Mesh
  source: str
  path: str
  step: int | None

  def merge(self):
    return nnx.merge(self.graphdef, self.params, self.rest)


def _latest_in(directory: Path) -> int | None:
  """Latest complete step under a checkpoints directory, or None."""
  if not directory.is_dir():
    return None
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def latest_step_dir(workdir: Path) -> Path | None:
  """`<workdir>/checkpoints/<step>` of the latest complete step, or None."""
  directory = Path(workdir) / "checkpoints"
  step = _latest_in(directory)
  return None if step is None else directory.absolute() / str(step)


def source_of(config, workdir: Path) -> tuple[str, str, int | None]:
  """(source, path, step) of the trained parameters, in `checkpoint.restore_run`'s order:
  the workdir's latest step, then `config.resume`, then `config.init_from`."""
  step_dir = latest_step_dir(workdir)
  if step_dir is not None:
    return "workdir", str(step_dir), int(step_dir.name)
  resume = config.get("resume", "")
  if resume:
    directory, step = ckpt_lib._step_dir(Path(resume))  # pylint: disable=protected-access
    step = step if step is not None else _latest_in(directory)
    if step is None:
      raise FileNotFoundError(f"config.resume={resume!r} holds no complete checkpoint")
    return "resume", str(directory.absolute() / str(step)), step
  if config.get("init_from", ""):
    path = str(config.init_from)
    return "init_from", path, int(Path(path).name) if Path(path).name.isdigit() else None
  raise FileNotFoundError(f"no trained parameters: {workdir / 'checkpoints'} holds no "
                          "checkpoint and config.resume / config.init_from are empty")


def load_for_inference(config, workdir: str | Path) -> Loaded:
  """Inputs, mesh and the trained model of `config` (see the module docstring for the source)."""
  workdir = Path(workdir)
  source, path, step = source_of(config, workdir)
  mesh = sharding.make_mesh(dict(config.get("mesh", None) or {"fsdp": -1}))
  inputs = inputs_lib.build_inputs(config, workdir, train=False)
  vocab = inputs.llm_tokenizer.vocab_size
  model = model_init.create_sharded(config, inputs.modalities, vocab, mesh,
                                    weights=inputs_lib.pretrained_weights(config, inputs))
  loaded, missing, unexpected = ckpt_lib.init_params(path, model.params, model.param_shardings)
  expected = [k for k, _ in nnx.to_flat_state(model.params)]
  if len(missing) == len(expected):  # nothing matched: scoring would see a random bridge
    raise ValueError(f"{source} {path}: matches none of the trainable parameters, e.g. "
                     f"{['/'.join(map(str, k)) for k in expected[:5]]} (its keys: "
                     f"{unexpected[:5]})")
  if source != "init_from" and missing:
    raise ValueError(f"{path} lacks trained parameters {missing[:5]} (of {len(missing)}): "
                     "written by another model config?")
  if missing or unexpected:
    logging.warning("%s: kept initial values for %s; ignored %s", path, missing, unexpected)
  params = nnx.merge_state(model.params, loaded)
  logging.info("inference parameters from %s (%s, step %s)", path, source, step)
  return Loaded(inputs=inputs, model=model, graphdef=model.graphdef, params=params,
                rest=model.rest, mesh=mesh, source=source, path=path, step=step)
