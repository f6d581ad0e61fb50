"""The one place that maps logical axis names onto mesh axes.

Model code names every parameter dimension with a logical axis (below); the trainer turns those
names into `NamedSharding`s over a mesh with axes ``data``, ``fsdp`` and ``tensor``.

Logical axes:
  batch      examples in a batch
  seq        token positions (LLM) / encoder tokens
  embed      model width of a tower (residual stream)
  mlp        feed-forward hidden width
  heads      attention heads x head dim (fused projection outputs)
  kv         key/value projection width (grouped-query attention)
  vocab      vocabulary rows
  queries    learned Q-Former query tokens
  enc_embed  width of a frozen encoder's features entering a Q-Former
  layers     stacked layers (scan)
  conv_in, conv_out, kernel   convolution dimensions
  norm       parameters of norms (never sharded)

Rule sets (`RULE_SETS`, chosen per part in `config.sharding`): frozen towers normally use
``fsdp_tensor`` (ZeRO-3 style weight sharding plus Megatron-style tensor sharding); the small
trainable bridges may use the same, ``fsdp`` only, or ``replicated`` (plain data parallelism).
A mesh axis is used at most once per array, and an axis that does not divide a dimension is
dropped for that array (e.g. the 32001-row vocabulary stays unsplit over ``tensor``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical axis -> mesh axis (or axes). Unlisted logical names are replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("enc_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("seq", None),
    ("queries", None),
    ("layers", None),
    ("norm", None),
)

RULE_SETS: dict[str, Rules] = {
    "fsdp_tensor": DEFAULT_RULES,
    "fsdp": tuple((k, None if v == "tensor" else v) for k, v in DEFAULT_RULES),
    "replicated": tuple((k, v if k == "batch" else None) for k, v in DEFAULT_RULES),
}


def rules(name: str) -> Rules:
  if name not in RULE_SETS:
    raise ValueError(f"unknown sharding rule set {name!r}; choose one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def logical_to_spec(axes: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, object]] = DEFAULT_RULES,  # pylint: disable=redefined-outer-name
                    shape: Sequence[int] | None = None,
                    mesh_shape: Mapping[str, int] | None = None) -> PartitionSpec:
  """PartitionSpec for a tuple of logical names; a mesh axis is used at most once.

  With `shape` and `mesh_shape`, each dimension keeps the longest prefix of its mesh axes whose
  product divides it, so every sharding is even.
  """
  if not axes:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used)
    if shape is not None and mesh_shape is not None:
      while names and shape[i] % math.prod(mesh_shape[n] for n in names):
        names = names[:-1]
      names = tuple(n for n in names if mesh_shape[n] > 1) or names[:0]
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*out)


def _is_var(x) -> bool:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return isinstance(x, nnx.Variable)


def _leaf_spec(leaf, rules, mesh_shape) -> PartitionSpec:  # pylint: disable=redefined-outer-name
  if _is_var(leaf):
    axes = leaf.get_metadata().get("out_sharding")
    shape = getattr(leaf.get_value(), "shape", ())
  else:
    axes, shape = None, getattr(leaf, "shape", ())
  return logical_to_spec(axes, rules, shape if mesh_shape else None, mesh_shape)


def param_specs(state, rules=DEFAULT_RULES, mesh: Mesh | None = None):  # pylint: disable=redefined-outer-name
  """PartitionSpecs of an NNX state, an optimizer state or any pytree of (abstract) arrays.

  `nnx.Variable` leaves (parameters, and the optimizer moments optax builds from them) are
  sharded by their logical names; other leaves (step counters) are replicated. With `mesh`, the
  specs are made even for that mesh (see `logical_to_spec`).
  """
  mesh_shape = dict(mesh.shape) if mesh is not None else None
  return jax.tree.map(lambda v: _leaf_spec(v, rules, mesh_shape), state, is_leaf=_is_var)


def named_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):  # pylint: disable=redefined-outer-name
  """`NamedSharding`s for `mesh`, in the exact tree structure of `state` (one per array leaf:
  usable as jit in/out shardings and zipped with the state by `jax.tree.map`)."""
  specs = jax.tree.leaves(param_specs(state, rules, mesh),
                          is_leaf=lambda x: isinstance(x, PartitionSpec))
  return jax.tree.unflatten(jax.tree.structure(state), [NamedSharding(mesh, s) for s in specs])


def abstract_with_shardings(state, shardings):
  """`jax.ShapeDtypeStruct`s carrying `shardings` (targets for sharded restores and lowering)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) with one -1 filled so that the product is `num_devices`."""
  unknown = [a for a in MESH_AXES if int(sizes.get(a, 1)) == -1]
  extra = set(sizes) - set(MESH_AXES)
  if extra:
    raise ValueError(f"mesh: unknown axes {sorted(extra)}; the axes are {MESH_AXES}")
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(int(sizes.get(a, 1)) for a in MESH_AXES if a not in unknown)
  if num_devices % known:
    raise ValueError(f"mesh {dict(sizes)} does not divide {num_devices} devices")
  fill = num_devices // known
  shape = tuple(fill if a in unknown else int(sizes.get(a, 1)) for a in MESH_AXES)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{num_devices} are there")
  return shape


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def abstract_mesh(sizes: Mapping[str, int], num_devices: int) -> jax.sharding.AbstractMesh:
  """A device-free mesh of the given size (planning for a machine this one is not)."""
  shape = mesh_shape(sizes, num_devices)
  return jax.sharding.AbstractMesh(shape, MESH_AXES,
                                   axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def batch_shards(mesh) -> int:
  """How many ways a batch is split (data x fsdp)."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def constrain(x: jax.Array, axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:  # pylint: disable=redefined-outer-name
  """`with_sharding_constraint` by logical names; a no-op outside a mesh context.

  Dimensions the mesh axes do not divide stay unsplit (the constraint never forces padding).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(axes, rules, x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def sharded_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (abstract or concrete) under `shardings` (same tree)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
      shardings, is_leaf=lambda y: isinstance(y, NamedSharding)), strict=True):
    shard = s.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total
