"""Sharded training on 8 simulated CPU devices (`sharded_worker.py`, in its own process because
the device count is fixed when JAX starts): a sharded step equals the single-device step,
microbatches equal the full batch, rematerialisation changes nothing, frozen parameters never
change, the optimizer holds state for trainable parameters only, no large parameter is
replicated, a NaN loss names its step."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def result() -> dict:
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_worker.py")], cwd=REPO,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [r for r in proc.stdout.splitlines() if r.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert out["devices"] == 8
  return out


def test_sharded_step_equals_single_device(result):
  np.testing.assert_allclose(result["losses"]["sharded"], result["losses"]["single"], rtol=1e-6)
  assert result["param_update"] > 1e-4  # the steps really moved the parameters
  assert result["param_diff_sharded"] < 1e-7


def test_microbatches_equal_full_batch(result):
  np.testing.assert_allclose(result["losses"]["micro"], result["losses"]["single"], rtol=1e-6)
  assert result["param_diff_micro"] < 5e-7
  assert result["grad_norm"]["micro"] == pytest.approx(result["grad_norm"]["single"], rel=1e-5)


def test_remat_policies_train_the_same(result):
  # LLM remat "full" and EVA remat, under FSDP over 8 devices: recomputation reorders sums.
  np.testing.assert_allclose(result["losses"]["remat"], result["losses"]["single"], rtol=1e-6)
  assert result["param_diff_remat"] < 5e-7


def test_frozen_parameters_do_not_change(result):
  assert result["frozen_diff"] == 0.0


def test_optimizer_state_only_for_trainable_parameters(result):
  assert result["opt_frozen_leaves"] == 0
  # AdamW: two moments per trainable element, plus a handful of scalar counters.
  extra = result["opt_state_bytes"] - 2 * result["trainable_elems"]
  assert 0 < extra <= 4, extra


def test_frozen_towers_are_split_over_devices(result):
  # data 2 x fsdp 2 x tensor 2: weights split 4 ways (norms and small tables replicated).
  assert result["frozen_device_fraction"] < 0.35


def test_no_large_parameter_replicated(result):
  assert result["param_count_7b_image"] == 188_837_376
  assert result["replicated_large_fsdp8"] == []
  assert result["replicated_large_fsdp4_tp2"] == []


def test_nan_loss_stops_naming_the_step(result):
  assert result["nan_error"] and "at step 3" in result["nan_error"]
