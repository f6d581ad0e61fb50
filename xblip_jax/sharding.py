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
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes). Unlisted logical names are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
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


def logical_to_spec(axes: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, object]] = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for a tuple of logical names; a mesh axis is used at most once."""
  if not axes:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in axes:
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used)
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*out)


def param_specs(state, rules=DEFAULT_RULES):
  """Maps an NNX state (or abstract state) to PartitionSpecs from each variable's metadata."""
  from flax import nnx

  def spec(var):
    return logical_to_spec(var.get_metadata().get("out_sharding"), rules)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
