"""A demo run stopped by SIGTERM (preemption: it saves and exits), restarted, then killed with
SIGKILL (during a checkpoint save when the kill lands there) and restarted again ends
bit-identical to an uninterrupted run: the same loss at every step, the same final parameters,
the same evaluation.

Runs `python -m xblip_jax.main` in subprocesses on 2 simulated devices (FSDP over both)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO

from xblip_jax.data import demo

STEPS = 6

CONFIG = """
import sys
sys.path.insert(0, {configs!r})
import demo


def get_config(arg=None):
  c = demo.get_config()
  c.data.root = {root!r}
  c.data.modalities = ("image",)
  c.data.train_datasets = ("image_qa", "image_caption")
  c.data.train_ratios = ()
  c.data.eval_datasets = ("image_qa",)
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.eval.num_examples = 4
  c.eval.max_new_tokens = 2
  c.model.demo_llm.steps = 10
  c.train.num_steps = {steps}
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  return c
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("demo_data")
  demo.write_demo_data(root, seed=0, sizes=demo.DemoSizes(
      image=(16, 8), video=(2, 2), audiocaps=(2, 2), clotho=(2, 2), pc=(2, 2), discrn=(2, 2)))
  path = root / "small.py"
  path.write_text(CONFIG.format(configs=str(REPO / "configs"), root=str(root), steps=STEPS))
  return path


def _command(config_file: Path, workdir: Path) -> list[str]:
  return [sys.executable, "-m", "xblip_jax.main", "--config", str(config_file),
          "--workdir", str(workdir)]


def _env() -> dict:
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
          "JAX_PLATFORMS": "cpu"}


def _run(config_file: Path, workdir: Path) -> dict:
  proc = subprocess.run(_command(config_file, workdir), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads((workdir / "summary.json").read_text())


def _logged_steps(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  rows = [r for r in path.read_text().splitlines() if r.strip()]
  return json.loads(rows[-1])["step"] if rows else 0


def _interrupt(config_file: Path, workdir: Path, sig: int, at: int) -> str:
  """Starts a run and sends `sig` during the save of step `at` (or, failing that, once step
  `at + 1` is logged)."""
  proc = subprocess.Popen(_command(config_file, workdir), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts, when = workdir / "checkpoints", None
  deadline = time.time() + 900
  while proc.poll() is None and time.time() < deadline:
    names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
    if any(n.startswith(f"{at}.") and "tmp" in n for n in names):
      when = f"during the save of step {at}"
    elif _logged_steps(workdir) > at:
      when = f"after step {at + 1}"
    if when:
      proc.send_signal(sig)
      break
    time.sleep(0.002)
  proc.wait(timeout=600)
  assert when, "the run ended before it could be interrupted"
  return when


def _final_params(workdir: Path) -> list[np.ndarray]:
  path = workdir / "checkpoints" / str(STEPS) / "state"
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  leaves = []

  def visit(node):
    if isinstance(node, dict):
      for key in sorted(node):
        visit(node[key])
    else:
      leaves.append(np.asarray(node))

  visit(state["params"])
  return leaves


def test_preempted_and_killed_run_resumes_bit_identical(config_file, tmp_path):
  reference = _run(config_file, tmp_path / "reference")
  run = tmp_path / "interrupted"
  # SIGTERM (preemption): saves at the next step boundary and stops cleanly.
  _interrupt(config_file, run, signal.SIGTERM, at=2)
  preempted = json.loads((run / "summary.json").read_text())
  assert preempted["preempted"] and 2 < preempted["steps"] < 4
  assert (run / "checkpoints" / str(preempted["steps"])).is_dir()
  # SIGKILL, during the save of step 4 when the kill lands there.
  when = _interrupt(config_file, run, signal.SIGKILL, at=4)
  print(f"killed {when}")
  resumed = _run(config_file, run)
  strip = lambda rows: [(r["step"], r["loss"], r["grad_norm"]) for r in rows]
  assert strip(resumed["history"]) == strip(reference["history"])
  assert [r["step"] for r in resumed["history"]] == list(range(1, STEPS + 1))
  assert resumed["eval"] == reference["eval"]
  ref_params, res_params = _final_params(tmp_path / "reference"), _final_params(run)
  assert len(ref_params) == len(res_params) > 0
  for a, b in zip(ref_params, res_params):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no duplicated rows
  assert list((tmp_path / "reference" / "tensorboard").glob("events.out.tfevents.*"))
