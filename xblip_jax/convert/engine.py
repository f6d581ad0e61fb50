"""The streaming conversion driver: key tables applied tensor by tensor, with a full report.

A `Plan` is one output component: its rule table (our paths <-> canonical source keys), the
abstract shapes of its targets (from `nnx.eval_shape` of the real module), and the `View`s it
reads, in priority order (e.g. the per-modality file, then a BLIP-2 stage-1 file). Conversion
runs in two passes:

1. keys only (no tensor data): missing, unexpected and skipped keys are found for every plan,
   and the whole conversion is refused before any data is read if it cannot be complete;
2. tensor by tensor: read, transform (`Rule.to_ours`), check the shape, cast by the dtype policy,
   keep. Mis-shaped tensors are collected and reported together.

At most one source tensor (plus its transformed copy) is alive besides the output arrays.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from xblip_jax.convert.io import Source
from xblip_jax.convert.mapping import CheckpointKeyError, Rule

DTYPE_POLICIES: dict[str, Any] = {"keep": None, "float32": np.float32,
                                  "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def cast(x: np.ndarray, policy: str, source_dtype: np.dtype) -> np.ndarray:
  """Floating arrays to the policy's dtype (`keep`: the source tensor's); others untouched."""
  if policy not in DTYPE_POLICIES:
    raise ValueError(f"dtype policy {policy!r}; choose one of {sorted(DTYPE_POLICIES)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  target = np.dtype(source_dtype if policy == "keep" else DTYPE_POLICIES[policy])
  if not jnp.issubdtype(target, jnp.floating):
    target = np.dtype(np.float32)
  return x if x.dtype == target else x.astype(target)


@dataclasses.dataclass(frozen=True)
class View:
  """A source seen under canonical key names.

  `renames` maps canonical prefixes to the source's prefixes (first match wins); a source key is
  in this view's namespace when it starts with one of the source prefixes and with none of
  `exclude`. Keys outside the namespace belong to other components and are not reported as
  unexpected.
  """

  source: Source
  renames: tuple[tuple[str, str], ...] = (("", ""),)
  exclude: tuple[str, ...] = ()
  label: str = ""

  def actual(self, canonical: str) -> str | None:
    for c, a in self.renames:
      if canonical.startswith(c):
        key = a + canonical[len(c):]
        return key if key in self.source and not key.startswith(self.exclude or ("\0",)) else None
    return None

  def canonical(self, actual: str) -> str | None:
    if self.exclude and actual.startswith(self.exclude):
      return None
    for c, a in self.renames:
      if actual.startswith(a):
        return c + actual[len(a):]
    return None

  def owned(self) -> list[str]:
    return [k for k in self.source.keys() if self.canonical(k) is not None]


@dataclasses.dataclass
class Plan:
  """One output component. `targets`: our path -> jax.ShapeDtypeStruct of every variable the
  component may hold (the rules' `ours` must be among them)."""

  name: str
  rules: Sequence[Rule]
  targets: Mapping[str, jax.ShapeDtypeStruct]
  views: Sequence[View]
  ignore: Sequence[str] = ()            # regexes (fullmatch) on canonical keys, expected + unused
  skip: Callable[[str], bool] | None = None  # source keys deliberately not loaded
  meta: dict = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ConversionReport:
  component: str
  converted: int = 0
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mis_shaped: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  fallback: list[str] = dataclasses.field(default_factory=list)
  left_at_init: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)
  outside: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)

  def describe(self, *, limit: int | None = None) -> str:
    lines = [f"[{self.component}] converted {self.converted} tensors"]
    groups = (("MISSING", self.missing), ("UNEXPECTED", self.unexpected),
              ("MIS-SHAPED", self.mis_shaped), ("skipped on request", self.skipped),
              ("taken from the fallback checkpoint", self.fallback),
              ("expected and unused (ignored)", self.ignored),
              ("not provided by this source (left at the model's initialisation)",
               self.left_at_init))
    for title, keys in groups:
      if keys:
        lines.append(f"  {len(keys)} {title}:")
        shown = keys if limit is None else keys[:limit]
        lines.extend(f"    {k}" for k in shown)
        if len(shown) < len(keys):
          lines.append(f"    ... and {len(keys) - len(shown)} more")
    if self.outside:
      lines.append(f"  {self.outside} source keys belong to other components (not read)")
    lines.extend(f"  note: {n}" for n in self.notes)
    return "\n".join(lines)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class _Resolved:
  rule: Rule
  view: View
  keys: list[str]
  fallback: bool


def _prepass(plan: Plan, allow_missing: bool) -> tuple[ConversionReport, list[_Resolved]]:
  report = ConversionReport(plan.name, notes=list(plan.notes))
  resolved, used = [], set()
  ignore = [re.compile(p) for p in plan.ignore]
  for r in plan.rules:
    for o in r.ours:
      if o not in plan.targets:
        raise ValueError(f"mapping table names {o!r}, which the {plan.name} model does not have")
    hit = None
    for i, view in enumerate(plan.views):
      keys = [view.actual(k) for k in r.theirs]
      if all(keys):
        hit = _Resolved(r, view, keys, i > 0)
        break
    if hit is None:
      primary = plan.views[0]
      names = [_expected_name(primary, k) for k in r.theirs if primary.actual(k) is None]
      used.update((id(primary), primary.actual(k)) for k in r.theirs if primary.actual(k))
      if plan.skip and any(plan.skip(n) for n in names):
        report.skipped.extend(names)
      else:
        report.missing.extend(names)
      continue
    used.update((id(hit.view), k) for k in hit.keys)
    if plan.skip and any(plan.skip(k) for k in hit.keys):
      report.skipped.extend(hit.keys)
      continue
    if hit.fallback:
      report.fallback.extend(f"{k} ({hit.view.label})" for k in hit.keys)
    resolved.append(hit)
  primary = plan.views[0]
  all_keys = set(primary.source.keys())
  owned = primary.owned()
  report.outside = len(all_keys) - len(owned)
  for k in owned:
    if (id(primary), k) in used:
      continue
    canonical = primary.canonical(k)
    if any(p.fullmatch(canonical) for p in ignore):
      report.ignored.append(k)
    elif plan.skip and plan.skip(k):
      report.skipped.append(k)
    else:
      report.unexpected.append(k)
  report.skipped = sorted(set(report.skipped))
  if allow_missing and report.missing:
    report.notes.append("--allow-missing: the missing tensors are not in the output")
  return report, resolved


def _expected_name(view: View, canonical: str) -> str:
  for c, a in view.renames:
    if canonical.startswith(c):
      return a + canonical[len(c):]
  return canonical


def _fail_if_incomplete(reports: Sequence[ConversionReport], allow_missing: bool) -> None:
  bad = [r for r in reports
         if r.unexpected or r.mis_shaped or (r.missing and not allow_missing)]
  if bad:
    hint = "\nNothing was written."
    if any(r.missing for r in bad) and not allow_missing:
      hint += (" Pass --allow-missing to write the tensors that are present (the missing ones "
               "stay at the model's initialisation).")
    raise CheckpointKeyError("\n".join(r.describe() for r in bad) + hint)


def _CPU() -> jax.Device:  # pylint: disable=invalid-name
  return jax.devices("cpu")[0]


def run(plans: Sequence[Plan], *, dtype: str = "keep", allow_missing: bool = False,
        log: Callable[[str], None] | None = None
        ) -> list[tuple[dict[str, jax.Array], ConversionReport]]:
  """Converts every plan; raises `CheckpointKeyError` (naming every key) if any is incomplete.

  Returns, per plan, our path -> host (CPU) `jax.Array`, and the report.
  """
  if dtype not in DTYPE_POLICIES:
    raise ValueError(f"--dtype {dtype!r}; choose one of {sorted(DTYPE_POLICIES)}")
  prepared = [_prepass(p, allow_missing) for p in plans]
  _fail_if_incomplete([r for r, _ in prepared], allow_missing)
  results = []
  for plan, (report, resolved) in zip(plans, prepared):
    out: dict[str, jax.Array] = {}
    for hit in resolved:
      arrays = [hit.view.source.read(k) for k in hit.keys]
      src_dtype = arrays[0].dtype
      try:
        values = hit.rule.to_ours(*arrays)
      except ValueError as e:
        report.mis_shaped.append(f"{', '.join(hit.keys)}: {e}")
        continue
      del arrays
      for ours, value in zip(hit.rule.ours, values, strict=True):
        want = tuple(plan.targets[ours].shape)
        if tuple(value.shape) != want:
          report.mis_shaped.append(f"{', '.join(hit.keys)}: {tuple(value.shape)} for {ours} "
                                   f"{want}")
          continue
        # A host-side jax.Array: Orbax saves it without the extra full copy it makes of a
        # numpy array (measured: peak 2x the checkpoint for numpy, 1x for jax.Array).
        out[ours] = jax.device_put(np.ascontiguousarray(cast(np.asarray(value), dtype,
                                                             src_dtype)), _CPU())
      del values
    covered = set(out)
    report.left_at_init = sorted(k for k in plan.targets if k not in covered)
    report.converted = len(out)
    if log:
      log(report.describe(limit=20))
    results.append((out, report))
  _fail_if_incomplete([r for _, r in results], allow_missing)
  return results
