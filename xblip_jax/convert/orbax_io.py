"""One Orbax checkpoint per converted component, and restoring it into a (sharded) model.

A component checkpoint is an Orbax composite with two items:

* ``state``: a nested dict of arrays keyed by our NNX paths, rooted at `XInstructBlip`
  (``llm.layers.0.self_attn.q_proj.kernel``, ``qformer.audio...``, ``encoders.image...``);
* ``meta``: JSON with the component kind, its `roots` (e.g. ``["llm"]``), the source files, the
  dtype policy, the architecture config, every array's shape/dtype and the conversion report.

`load_component` restores it into a model or an abstract model (`nnx.eval_shape`), placing each
array with the target's sharding (or the one derived from the variables' logical axes and a
mesh), so that a 7B LLM is read straight onto its shards.

`init_from` in a trainer (not wired here):

    abstract = nnx.eval_shape(lambda: build_model(config.model, modalities, seed=seed))
    for directory in config.init_from:            # e.g. [".../llm", ".../bridge-image"]
      load_component(directory, abstract, mesh=mesh)
    # `still_abstract(abstract)` lists what no component provided (initialise those).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from xblip_jax.convert.io import CheckpointFileError, iter_chunks
from xblip_jax.convert.mapping import CheckpointKeyError, flat_params, path_str
from xblip_jax.sharding import DEFAULT_RULES, logical_to_spec

FORMAT = "xblip_jax.component/1"
_CHUNK_BYTES = 1 << 28


def _nest(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    parts = path.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def save_component(directory: str | Path, arrays: Mapping[str, Any], meta: Mapping,
                   *, overwrite: bool = False) -> Path:
  """Writes `arrays` (our paths -> host `jax.Array`s, or numpy) and `meta` as one Orbax
  checkpoint (uncompressed: zstd would double the save time and its buffers the memory)."""
  directory = Path(directory).absolute()
  if not arrays:
    raise CheckpointKeyError(f"{directory}: nothing to write (no tensors converted)")
  if directory.exists():
    if not overwrite:
      raise FileExistsError(f"{directory} exists; pass --overwrite to replace it")
    shutil.rmtree(directory)
  meta = dict(meta, format=FORMAT, arrays={
      k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(arrays.items())})
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      state=ocp.PyTreeCheckpointHandler(use_compression=False), meta=ocp.JsonCheckpointHandler()))
  ckptr.save(directory, args=ocp.args.Composite(state=ocp.args.PyTreeSave(_nest(arrays)),
                                                meta=ocp.args.JsonSave(meta)))
  ckptr.close()
  return directory


def read_meta(directory: str | Path) -> dict:
  directory = Path(directory).absolute()
  if not (directory / "meta").is_dir() or not (directory / "state").is_dir():
    raise CheckpointFileError(f"{directory}: not an xblip_jax component checkpoint "
                              "(expected the Orbax items 'state' and 'meta')")
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  meta = ckptr.restore(directory, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  if meta.get("format") != FORMAT:
    raise CheckpointFileError(f"{directory}: unknown component format {meta.get('format')!r}")
  return meta


def _restore_numpy(state_dir: Path, keys: Sequence[str], shapes: Mapping[str, Any],
                   prefix: str = "", suffix: str = "") -> dict[str, np.ndarray]:
  full = {prefix + k + suffix: shapes[k] for k in keys}
  item = _nest({k: np.zeros((), np.float32) for k in full})
  restore_args = _nest({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in full})
  out = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                              partial_restore=True))
  flat = _flatten(out)
  return {k: np.asarray(flat[prefix + k + suffix]) for k in keys}


class ArrayStore:
  """Arrays of component checkpoints and/or trainer checkpoints, read chunk by chunk."""

  def __init__(self):
    self.shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    self._where: dict[str, tuple[Path, str, str]] = {}
    self.metas: list[dict] = []

  def add_component(self, directory: str | Path) -> dict:
    directory = Path(directory).absolute()
    meta = read_meta(directory)
    self._add(directory / "state", {k: (tuple(v["shape"]), v["dtype"])
                                    for k, v in meta["arrays"].items()}, "", "", str(directory))
    self.metas.append(meta)
    return meta

  def add_trainer(self, path: str | Path, step: int | None = None) -> Path:
    """The trainable `params` of a trainer checkpoint (workdir, checkpoints folder or step)."""
    step_dir = trainer_step_dir(Path(path), step)
    meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state")
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if not isinstance(tree, Mapping) or "params" not in tree:
      raise CheckpointFileError(f"{step_dir}: no 'params' in the trainer checkpoint")
    flat = {}
    for k, m in _flatten(tree["params"]).items():
      key = k[:-len(".value")] if k.endswith(".value") else k
      flat[key] = (tuple(m.shape), str(m.dtype))
    suffix = ".value" if any(k.endswith(".value") for k in _flatten(tree["params"])) else ""
    self._add(step_dir / "state", flat, "params.", suffix, str(step_dir))
    self.metas.append({"kind": "trainer", "source": str(step_dir)})
    return step_dir

  def _add(self, state_dir, shapes, prefix, suffix, label):
    for k, v in shapes.items():
      if k in self._where:
        raise CheckpointKeyError(f"{k} is in both {self._where[k][0].parent} and {label}")
      self.shapes[k] = v
      self._where[k] = (state_dir, prefix, suffix)

  def nbytes(self, key: str) -> int:
    shape, dtype = self.shapes[key]
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    groups: dict[tuple, list[str]] = {}
    for k in keys:
      groups.setdefault(self._where[k], []).append(k)
    for (state_dir, prefix, suffix), ks in groups.items():
      out.update(_restore_numpy(state_dir, ks, self.shapes, prefix, suffix))
    return out

  def iter_read(self, keys: Sequence[str], chunk_bytes: int = _CHUNK_BYTES
                ) -> Iterator[dict[str, np.ndarray]]:
    for chunk in iter_chunks(list(keys), self.nbytes, chunk_bytes):
      yield self.read(chunk)


def trainer_step_dir(path: Path, step: int | None = None) -> Path:
  if (path / "state").is_dir() and step is None:
    return path
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()
                 and (p / "state").is_dir()) if path.is_dir() else []
  if not steps:
    raise CheckpointFileError(f"{path}: no trainer checkpoint steps found")
  if step is not None and step not in steps:
    raise CheckpointFileError(f"{path}: no step {step} (have {steps})")
  return path / str(step if step is not None else steps[-1])


# ------------------------------------------------------------------------------ restoring


def _target_variables(target) -> dict[str, nnx.Variable]:
  if isinstance(target, nnx.Module):
    return flat_params(target)
  if isinstance(target, nnx.State):
    return {path_str(p): v for p, v in nnx.to_flat_state(target)}
  raise TypeError(f"load_component needs an nnx.Module or nnx.State, got {type(target).__name__}")


def _divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """`spec` with every dimension that the mesh cannot split evenly replicated instead (e.g. a
  32001-row vocabulary over 2 devices), so that restoring never fails on a shape."""
  out = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if shape[i] % ways == 0 else None)
  return PartitionSpec(*out)


def _sharding(var: nnx.Variable, mesh: Mesh | None, rules) -> jax.sharding.Sharding:
  if mesh is not None:
    spec = logical_to_spec(var.get_metadata().get("out_sharding"), rules)
    return NamedSharding(mesh, _divisible_spec(spec, tuple(var.get_value().shape), mesh))
  value = var.get_value()
  sharding = getattr(value, "sharding", None)
  return sharding if sharding is not None else SingleDeviceSharding(jax.devices()[0])


def load_component(checkpoint_dir: str | Path, model_or_abstract_state, *,
                   subtree: str | None = None, mesh: Mesh | None = None,
                   rules=DEFAULT_RULES, strict: bool = True,
                   chunk_bytes: int = _CHUNK_BYTES):
  """Restores a component checkpoint into a model or an (abstract) state, sharded on restore.

  Args:
    checkpoint_dir: a directory written by `python -m xblip_jax.convert import ...`.
    model_or_abstract_state: an `nnx.Module` (concrete or from `nnx.eval_shape`) or an
      `nnx.State` of one (e.g. `nnx.state(abstract, trainable)`); updated in place. Either the
      whole `XInstructBlip`, or the component's own module (a bare `Llama` for ``llm``).
    subtree: where the target sits in `XInstructBlip` (e.g. ``"llm"``, ``"encoders.image"``);
      found automatically from the component's roots when omitted.
    mesh: with a mesh, every array is placed by its variable's logical axes (`sharding.py`
      rules; a dimension the mesh cannot split evenly is replicated); without, by the target
      value's own sharding (or on the first device).
    rules: logical-axis rules used with `mesh`.
    strict: fail if a stored array has no place in the target (otherwise it is skipped).
    chunk_bytes: arrays are restored in groups of about this many bytes (bounded overhead).

  Returns:
    `model_or_abstract_state`, its variables updated in place.

  Raises:
    CheckpointKeyError: stored arrays missing from the target, or of another shape, by name.
  """
  directory = Path(checkpoint_dir).absolute()
  meta = read_meta(directory)
  stored = {k: tuple(v["shape"]) for k, v in meta["arrays"].items()}
  variables = _target_variables(model_or_abstract_state)
  prefix = _resolve_prefix(stored, variables, meta.get("roots", []), subtree)
  chosen = {k: k[len(prefix):] for k in stored if k.startswith(prefix)}
  absent = sorted(k for k, t in chosen.items() if t not in variables)
  outside = sorted(set(stored) - set(chosen))
  if strict and (absent or outside):
    raise CheckpointKeyError(f"{directory}: stored arrays with no place in the target:\n"
                             + "\n".join(f"  {k}" for k in absent + outside))
  chosen = {k: t for k, t in chosen.items() if t in variables}
  bad = [f"  {k}: stored {stored[k]}, model {tuple(variables[t].get_value().shape)}"
         for k, t in chosen.items() if tuple(variables[t].get_value().shape) != stored[k]]
  if bad:
    raise CheckpointKeyError(f"{directory}: mis-shaped arrays:\n" + "\n".join(bad))
  sizes = {k: int(np.prod(stored[k], dtype=np.int64)) * np.dtype(
      variables[t].get_value().dtype).itemsize for k, t in chosen.items()}
  ckptr = ocp.PyTreeCheckpointer()
  for chunk in iter_chunks(list(chosen), sizes.__getitem__, chunk_bytes):
    # Chunked partial restores: Orbax buffers a whole restore, so this bounds the overhead.
    item, restore_args = {}, {}
    for k in chunk:
      var = variables[chosen[k]]
      sharding = _sharding(var, mesh, rules)
      dtype = var.get_value().dtype
      item[k] = jax.ShapeDtypeStruct(stored[k], dtype, sharding=sharding)
      restore_args[k] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype,
                                             global_shape=stored[k])
    restored = _flatten(ckptr.restore(directory / "state", args=ocp.args.PyTreeRestore(
        item=_nest(item), restore_args=_nest(restore_args), partial_restore=True)))
    for k in chunk:
      variables[chosen[k]].set_value(restored.pop(k))
  return model_or_abstract_state  # its Variables were updated in place


def _resolve_prefix(stored, variables, roots, subtree) -> str:
  if subtree is not None:
    return subtree.rstrip(".") + "." if subtree else ""
  if all(k in variables for k in stored):
    return ""
  for root in roots:
    keys = [k for k in stored if k.startswith(root + ".")]
    if keys and all(k[len(root) + 1:] in variables for k in keys):
      return root + "."
  return ""


def still_abstract(model: nnx.Module) -> list[str]:
  """Paths whose values are still `jax.ShapeDtypeStruct` (no component provided them)."""
  return sorted(k for k, v in flat_params(model).items()
                if isinstance(v.get_value(), jax.ShapeDtypeStruct))
