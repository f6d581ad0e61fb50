"""Loading a golden case and comparing arrays against it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Case:
  """One reference case: LAVIS-named parameters, inputs, outputs and the json sidecar."""

  name: str
  params: dict[str, np.ndarray]
  inputs: dict[str, np.ndarray]
  outputs: dict[str, np.ndarray]
  meta: dict[str, Any]


def load_case(path: str | Path) -> Case:
  path = Path(path)
  data = np.load(path)
  groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "input": {}, "output": {}}
  for key in data.files:
    group, _, name = key.partition("/")
    if group in groups:
      groups[group][name] = data[key]
  sidecar = path.with_suffix(".json")
  meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
  return Case(path.stem, groups["param"], groups["input"], groups["output"], meta)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The largest absolute error of one output against its reference."""

  name: str
  max_abs: float
  atol: float
  rtol: float
  ok: bool

  def line(self) -> str:
    verdict = "ok" if self.ok else "FAIL"
    return f"{self.name}: max_abs={self.max_abs:.3g} (atol={self.atol:g}, rtol={self.rtol:g}) {verdict}"


def compare(name: str, got, want, *, atol: float = 1e-5, rtol: float = 1e-5) -> Comparison:
  """Compares like `np.testing.assert_allclose`; exact for integer and boolean arrays."""
  got = np.asarray(got)
  want = np.asarray(want)
  if got.shape != want.shape:
    return Comparison(f"{name} shape {got.shape} != {want.shape}", float("inf"), atol, rtol, False)
  if want.dtype.kind in "biu":
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    max_abs = float(diff.max()) if diff.size else 0.0
    return Comparison(name, max_abs, 0.0, 0.0, max_abs == 0)
  diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
  max_abs = float(diff.max()) if diff.size else 0.0
  ok = bool(np.all(diff <= atol + rtol * np.abs(want.astype(np.float64))))
  return Comparison(name, max_abs, atol, rtol, ok)
