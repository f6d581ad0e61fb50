"""Shared test fixtures: where the golden cases live, and float32-exact JAX settings."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

from xblip_jax.golden import CHECKERS, checker_for

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("XBLIP_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def golden_cases(prefix: str) -> list[Path]:
  """Every case file of one component, so that extra cases (other seeds, shapes) run too."""
  if not GOLDEN_DIR.is_dir():
    raise FileNotFoundError(f"golden directory {GOLDEN_DIR} not found (set XBLIP_GOLDEN_DIR)")
  return sorted(p for p in GOLDEN_DIR.glob(f"{prefix}_*.npz")
                if checker_for(p.stem) == CHECKERS[prefix])


@pytest.fixture(scope="session")
def golden_dir() -> Path:
  if not GOLDEN_DIR.is_dir():
    pytest.fail(f"golden directory {GOLDEN_DIR} not found (set XBLIP_GOLDEN_DIR)")
  return GOLDEN_DIR
