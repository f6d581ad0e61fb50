"""Orbax checkpoints: trainable state, optimizer state, step, RNG, and each host's Grain
iterator state, in one `CheckpointManager` per workdir.

Items of a step folder:
  state  params (trainable only), opt_state, step, rng (StandardSave, sharded, every host)
  data   `process_<i>-of-<n>.json`: host i's iterator state, captured when the save starts
  meta   JSON from process 0 (loss history, summary bits)

Frozen towers (LLM, encoders) are never written: they reload from their source weights. Saves
are asynchronous: a step folder appears under its final name only once every item is written,
so a run killed at any moment (even during a save) resumes from the last complete step.

Restore order (`resume_source`): the workdir's own latest step, then `config.resume` (another
run's checkpoints: full state), then `config.init_from` (trainable parameters only; keys it
lacks keep their initial values and are reported by name).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx


class DataStateHandler(ocp.CheckpointHandler):
  """Writes and reads one JSON file per process (Grain iterator states differ per host)."""

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    self._file(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    del args
    path = self._file(directory)
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing: was the checkpoint written with another "
                              "number of processes?")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


@dataclasses.dataclass
class Restored:
  """What a restore brought back; `data`/`meta` are None for `init_from`."""

  source: str
  path: str
  step: int
  state: Any
  data: Any = None
  meta: dict | None = None


class Checkpointer:
  """The workdir's `CheckpointManager` with keep-N and asynchronous saves."""

  def __init__(self, directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any, meta: dict, *,
           force: bool = False) -> bool:
    """Starts an (async) save of `step`; the iterator state is copied now, before it moves."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataStateSave(copy.deepcopy(data_state)),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
    """(state, this host's data state, meta); `abstract_state` carries target shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(),
        meta=ocp.args.JsonRestore()))
    return out.state, out.data, out.meta

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: whether every host agreed that a preemption notice arrived (JAX's sync)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _step_dir(path: Path) -> tuple[Path, int | None]:
  """(checkpoints directory, step) of `.../checkpoints/<step>` or `.../checkpoints`."""
  if path.name.isdigit():
    return path.parent, int(path.name)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  return path, None


def restore_run(ckpt: Checkpointer, config, abstract_state) -> Restored | None:
  """The workdir's latest step, else `config.resume`; None when neither exists."""
  latest = ckpt.latest_step()
  if latest is not None:
    state, data, meta = ckpt.restore(latest, abstract_state)
    return Restored("workdir", str(ckpt.directory), latest, state, data, meta)
  resume = config.get("resume", "")
  if not resume:
    return None
  directory, step = _step_dir(Path(resume))
  other = Checkpointer(directory, async_save=False)
  step = step if step is not None else other.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.resume={resume!r} holds no complete checkpoint")
  state, data, meta = other.restore(step, abstract_state)
  other.close()
  return Restored("resume", resume, step, state, data, meta)


def init_params(path: str, abstract_params, shardings) -> tuple[Any, list[str], list[str]]:
  """Trainable parameters from `config.init_from`, restored into their shards.

  `path` is one of our step folders (its `state/params`), or an Orbax directory holding a
  parameter tree. Returns (loaded params subset, our keys it lacks, its keys we lack); the
  caller keeps initial values for the missing ones.
  """
  directory = Path(path).absolute()
  prefix: tuple = ()
  if (directory / "state").is_dir():
    directory, prefix = directory / "state", ("params",)
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(directory)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
    for key in prefix:
      tree = tree[key]
    theirs = dict(_flatten(tree))
    # Stored keys as written: an nnx state saved whole keeps a `value` level under each leaf.
    stored = {k: raw for k, raw in zip(theirs, _flatten(tree, strip=False))}
    ours = {"/".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(abstract_params)}
    sh = {p: _value(v) for p, v in nnx.to_flat_state(shardings)}
    common = sorted(set(theirs) & set(ours))
    shape = lambda k: tuple(_value(ours[k][1]).shape)
    bad = [k for k in common if tuple(theirs[k].shape) != shape(k)]
    if bad:
      raise ValueError("init_from: mis-shaped parameters: " + ", ".join(
          f"{k} {tuple(theirs[k].shape)} vs {shape(k)}" for k in bad))
    target: dict = {}
    for k in common:
      node = target
      parts = stored[k][0].split("/")
      for part in parts[:-1]:
        node = node.setdefault(part, {})
      value = _value(ours[k][1])
      node[parts[-1]] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sh[ours[k][0]])
    for key in reversed(prefix):
      target = {key: target}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target)
    loaded = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, transforms={}))
  for key in prefix:
    loaded = loaded[key]
  flat = {k: v for k, v in _flatten(loaded)}
  state = nnx.from_flat_state([(ours[k][0], ours[k][1].replace(flat[k])) for k in common])
  missing = sorted(set(ours) - set(theirs))
  unexpected = sorted(set(theirs) - set(ours))
  logging.info("init_from %s: %d tensors loaded, %d missing, %d unexpected", path, len(common),
               len(missing), len(unexpected))
  return state, missing, unexpected


def _value(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def _path(p) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)


def _flatten(tree, strip: bool = True) -> list[tuple[str, Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
  out = []
  for p, v in leaves:
    key = _path(p)
    key = key[:-len("/value")] if strip and key.endswith("/value") else key
    out.append((key, v))
  return out
