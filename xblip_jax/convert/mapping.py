"""Key-mapping tables between our NNX parameter paths and PyTorch state-dict keys.

A converter is data: a list of `Rule`s, each tying one or more of our parameters (dotted NNX
state paths such as ``encoder.layers.0.attention.query.kernel``) to one or more source keys
(``bert.encoder.layer.0.attention.self.query.weight``) with a pair of transforms that are
inverses of each other. The same table loads PyTorch weights into a model (`load_state_dict`)
and writes a model back out (`export_state_dict`).

Every load reports missing, unexpected and mis-shaped keys by name and refuses a partial result
unless `allow_missing=True`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

Arrays = tuple[np.ndarray, ...]


def _identity(*xs: np.ndarray) -> Arrays:
  return tuple(xs)


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ours` (NNX paths) <-> `theirs` (source keys), with `to_ours`/`to_theirs` transforms.

  Transforms take and return tuples of arrays in the order of `theirs`/`ours` respectively.
  """

  ours: tuple[str, ...]
  theirs: tuple[str, ...]
  to_ours: Callable[..., Arrays] = _identity
  to_theirs: Callable[..., Arrays] = _identity


def rule(ours: str | Sequence[str], theirs: str | Sequence[str],
         to_ours: Callable[..., Arrays] = _identity,
         to_theirs: Callable[..., Arrays] = _identity) -> Rule:
  as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)
  return Rule(as_tuple(ours), as_tuple(theirs), to_ours, to_theirs)


def _transpose(x: np.ndarray) -> Arrays:
  return (np.ascontiguousarray(x.T),)


def copy(ours: str, theirs: str) -> Rule:
  return rule(ours, theirs)


def linear(ours: str, theirs: str, *, bias: bool = True) -> list[Rule]:
  """torch Linear `weight (out, in)` <-> Flax `kernel (in, out)`; bias copied."""
  rules = [rule(f"{ours}.kernel", f"{theirs}.weight", _transpose, _transpose)]
  if bias:
    rules.append(copy(f"{ours}.bias", f"{theirs}.bias"))
  return rules


def layer_norm(ours: str, theirs: str, *, bias: bool = True) -> list[Rule]:
  """torch LayerNorm `weight`/`bias` <-> our `scale`/`bias`."""
  rules = [copy(f"{ours}.scale", f"{theirs}.weight")]
  if bias:
    rules.append(copy(f"{ours}.bias", f"{theirs}.bias"))
  return rules


def embedding(ours: str, theirs: str) -> Rule:
  """torch Embedding `weight (V, D)` <-> nnx.Embed `embedding (V, D)`."""
  return copy(f"{ours}.embedding", f"{theirs}.weight")


def conv(ours: str, theirs: str, *, bias: bool = True) -> list[Rule]:
  """torch ConvNd `weight (out, in/g, *k)` <-> nnx.Conv `kernel (*k, in/g, out)`."""

  def to_ours(w: np.ndarray) -> Arrays:
    nd = w.ndim - 2
    return (np.ascontiguousarray(np.transpose(w, tuple(range(2, 2 + nd)) + (1, 0))),)

  def to_theirs(k: np.ndarray) -> Arrays:
    nd = k.ndim - 2
    return (np.ascontiguousarray(np.transpose(k, (nd + 1, nd) + tuple(range(nd)))),)

  rules = [rule(f"{ours}.kernel", f"{theirs}.weight", to_ours, to_theirs)]
  if bias:
    rules.append(copy(f"{ours}.bias", f"{theirs}.bias"))
  return rules


class CheckpointKeyError(KeyError):
  """A state dict does not fit a model; the message lists every offending key."""

  def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
    return str(self.args[0])


@dataclasses.dataclass
class LoadReport:
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mis_shaped: list[str] = dataclasses.field(default_factory=list)
  loaded: int = 0

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mis_shaped)

  def describe(self) -> str:
    lines = [f"loaded {self.loaded} tensors"]
    for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                       ("mis-shaped", self.mis_shaped)):
      if keys:
        lines.append(f"{len(keys)} {name} key(s):")
        lines.extend(f"  {k}" for k in keys)
    return "\n".join(lines)


def path_str(path: Iterable) -> str:
  return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Dotted path -> Variable for every variable of `model` (params and buffers)."""
  return {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model))}


def load_state_dict(
    model: nnx.Module,
    rules: Sequence[Rule],
    state_dict: Mapping[str, np.ndarray],
    *,
    prefix: str = "",
    ignore: Sequence[str] = (),
    allow_missing: bool = False,
    strict_unexpected: bool = True,
) -> LoadReport:
  """Copies `state_dict[prefix + theirs]` into `model` following `rules`, in place.

  Args:
    model: the NNX module to fill.
    rules: the mapping table.
    state_dict: source arrays (numpy or torch tensors converted by the caller).
    prefix: prepended to every source key (e.g. ``"audio_Qformer."``).
    ignore: regular expressions (matched against the key without prefix) of source keys that are
      expected and deliberately unused (buffers such as ``position_ids``).
    allow_missing: leave parameters whose source keys are absent at their current values.
    strict_unexpected: whether unexpected keys under `prefix` make the load fail.

  Raises:
    CheckpointKeyError: listing missing, unexpected and mis-shaped keys.
  """
  params = flat_params(model)
  report = LoadReport()
  used: set[str] = set()
  updates: dict[str, np.ndarray] = {}
  for r in rules:
    keys = [prefix + k for k in r.theirs]
    absent = [k for k in keys if k not in state_dict]
    if absent:
      report.missing.extend(absent)
      continue
    used.update(keys)
    values = r.to_ours(*(np.asarray(state_dict[k]) for k in keys))
    for ours, value in zip(r.ours, values, strict=True):
      if ours not in params:
        raise ValueError(f"mapping table names {ours!r}, which the model does not have")
      want = tuple(params[ours].get_value().shape)
      if tuple(value.shape) != want:
        report.mis_shaped.append(f"{', '.join(keys)}: {tuple(value.shape)} for {ours} {want}")
        continue
      updates[ours] = value
  ignore_res = [re.compile(p) for p in ignore]
  for k in state_dict:
    if not k.startswith(prefix) or k in used:
      continue
    if any(p.fullmatch(k[len(prefix):]) for p in ignore_res):
      continue
    report.unexpected.append(k)
  if not strict_unexpected:
    report.unexpected = []
  if report.mis_shaped or report.unexpected or (report.missing and not allow_missing):
    raise CheckpointKeyError(report.describe())
  for ours, value in updates.items():
    var = params[ours]
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
  report.loaded = len(updates)
  nnx.update(model, nnx.State.from_flat_path({tuple(_split(k)): v for k, v in params.items()}))
  return report


def _split(path: str) -> list:
  return [int(p) if p.isdigit() else p for p in path.split(".")]


def export_state_dict(model: nnx.Module, rules: Sequence[Rule], *,
                      prefix: str = "") -> dict[str, np.ndarray]:
  """The inverse of `load_state_dict`: our parameters under the source's key names."""
  params = flat_params(model)
  out: dict[str, np.ndarray] = {}
  for r in rules:
    values = r.to_theirs(*(np.asarray(params[k].get_value()) for k in r.ours))
    for key, value in zip(r.theirs, values, strict=True):
      out[prefix + key] = value
  return out


def unmapped_params(model: nnx.Module, rules: Sequence[Rule]) -> list[str]:
  """Our parameters that no rule covers: a converter must return an empty list."""
  covered = {p for r in rules for p in r.ours}
  return sorted(k for k, v in flat_params(model).items()
                if isinstance(v, nnx.Param) and k not in covered)


def prefixed(rules: Sequence[Rule], ours: str = "", theirs: str = "") -> list[Rule]:
  """The same table for a sub-module: `ours`/`theirs` prepended to every path/key."""
  return [dataclasses.replace(r, ours=tuple(ours + p for p in r.ours),
                              theirs=tuple(theirs + k for k in r.theirs)) for r in rules]
