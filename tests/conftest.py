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


def small_demo_config(root, steps: int, *, checkpoint_every: int = 2):
  """`configs/demo.py` shrunk to seconds: image + pc, batch 4, 4 eval rows, 3 new tokens."""
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "configs"))
  import demo as demo_config  # pylint: disable=import-outside-toplevel

  c = demo_config.get_config()
  c.data.root = str(root)
  c.data.modalities = ("image", "pc")
  c.data.train_datasets = ("image_qa", "pc_qa")
  c.data.train_ratios = ()
  c.model.encoders_init = {}     # random 3D encoder: the PCA fit has its own test
  c.data.eval_datasets = ("image_qa", "discrn_image_pc")
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.eval.num_examples = 4
  c.eval.max_new_tokens = 3
  c.model.demo_llm.steps = 10
  c.train.num_steps = steps
  c.train.log_every = 1
  c.train.checkpoint_every = checkpoint_every
  return c
