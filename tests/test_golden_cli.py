"""`python -m xblip_jax.golden` on every reference case, and its failure path."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN_DIR
from xblip_jax.golden import __main__ as golden_main


def test_every_golden_case_passes(capsys):
  files = sorted(str(p) for p in GOLDEN_DIR.glob("*.npz"))
  assert files, f"no golden cases in {GOLDEN_DIR}"
  assert golden_main.main(files) == 0, capsys.readouterr().out
  out = capsys.readouterr().out
  assert out.count("PASS") == len(files)


def test_a_perturbed_case_fails(tmp_path, capsys):
  src = GOLDEN_DIR / "qformer_a.npz"
  data = dict(np.load(src))
  data["output/query_output"] = data["output/query_output"] + 1e-3
  bad = tmp_path / "qformer_perturbed.npz"
  np.savez(bad, **data)
  (tmp_path / "qformer_perturbed.json").write_text((GOLDEN_DIR / "qformer_a.json").read_text())
  assert golden_main.main([str(bad)]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_unknown_component_is_an_error(tmp_path, capsys):
  bad = tmp_path / "nonsense_a.npz"
  np.savez(bad, x=np.zeros(1))
  assert golden_main.main([str(bad)]) == 1
  assert "no golden checker" in capsys.readouterr().out
