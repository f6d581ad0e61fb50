"""The main job on a shrunken demo config: trains, checkpoints, resumes (in its own workdir and,
through `config.resume`, in a new one), evaluates, summarises; and a bad config field stops
`main` with the field's name."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, small_demo_config
from xblip_jax.data import demo
from xblip_jax.train import checkpoint as ckpt_lib
from xblip_jax.train.trainer import train_and_evaluate


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo_data")
  demo.write_demo_data(root, seed=0, sizes=demo.DemoSizes(
      image=(16, 8), video=(4, 2), audiocaps=(4, 2), clotho=(2, 2), pc=(16, 8), discrn=(2, 2)))
  return root


def _config(root, steps):
  return small_demo_config(root, steps)


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
  """Run A trains 2 steps; run B starts in a new workdir with `resume` = A's checkpoints and
  trains to step 4; then A itself resumes in its own workdir and trains to step 4."""
  a, b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
  first = train_and_evaluate(_config(demo_root, steps=2), a)
  config = _config(demo_root, steps=4)
  config.resume = str(a / "checkpoints")
  resumed_b = train_and_evaluate(config, b)
  second = train_and_evaluate(_config(demo_root, steps=4), a)
  return dict(a=a, b=b, first=first, resumed_b=resumed_b, second=second)


def test_demo_trains_checkpoints_and_resumes(runs):
  workdir, first, second = runs["a"], runs["first"], runs["second"]
  assert first["steps"] == 2 and first["first_loss"] > 0
  assert (workdir / "checkpoints" / "2").is_dir()
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary == json.loads(json.dumps(second))
  assert [row["step"] for row in summary["history"]] == [1, 2, 3, 4]
  assert set(summary["eval"]) == {"image_qa", "discrn_image_pc"}
  for metrics in summary["eval"].values():
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_examples"] > 0
  assert "image_qa" in summary["data"]["bad_records"]
  preds = json.loads((workdir / "eval" / "image_qa.json").read_text())["predictions"]
  assert preds and all("prediction" in p and p["answers"] for p in preds)


def _saved(workdir, step: int) -> tuple[dict[str, np.ndarray], object]:
  """(flat params / opt_state / step / rng as numpy, the host's iterator state) of a step."""
  path = workdir / "checkpoints" / str(step)
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path / "state")
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ckptr.restore(path / "state", args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  data = json.loads(next((path / "data").glob("process_*.json")).read_text())
  return flat, data


def test_config_resume_continues_another_run(runs, demo_root):
  a, b = runs["a"], runs["b"]
  resumed, continued = runs["resumed_b"], runs["second"]
  # B continued from A's step 2: A's history up to 2, then the same steps A itself trains.
  assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
  strip = lambda rows: [(r["step"], r["loss"], r["grad_norm"]) for r in rows]
  assert strip(resumed["history"][:2]) == strip(runs["first"]["history"])
  assert strip(resumed["history"]) == strip(continued["history"])
  assert not (b / "checkpoints" / "2").exists()  # B trained steps 3-4 only
  # Same params, optimizer state, RNG and data iterator at step 4: nothing restarted fresh.
  (got, got_data), (want, want_data) = _saved(b, 4), _saved(a, 4)
  assert got.keys() == want.keys()
  assert any("opt_state" in k and "mu" in k for k in got) and any("rng" in k for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert got_data == want_data
  assert resumed["eval"] == continued["eval"]
  # The workdir's own checkpoint wins over `resume`; `resume` serves an empty workdir.
  config = _config(demo_root, steps=4)
  config.resume = str(a / "checkpoints" / "2")
  restored = {}
  for name in ("checkpoints", "empty"):
    ckpt = ckpt_lib.Checkpointer(b / name)
    restored[name] = ckpt_lib.restore_run(ckpt, config, None)  # None: restore as saved
    ckpt.close()
  own, other = restored["checkpoints"], restored["empty"]
  assert (own.source, own.step) == ("workdir", 4)
  assert (other.source, other.step) == ("resume", 2)
  np.testing.assert_array_equal(np.asarray(other.state["step"]), 2)


def test_unknown_config_field_is_named(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "xblip_jax.main", "--config", str(REPO / "configs" / "demo.py"),
       "--workdir", str(tmp_path), "--config.trian.num_steps=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "trian" in proc.stderr
