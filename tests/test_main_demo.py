"""The main job on a shrunken demo config: trains, checkpoints, resumes, evaluates, summarises;
and a bad config field stops `main` with the field's name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from xblip_jax.data import demo
from xblip_jax.train.trainer import train_and_evaluate

sys.path.insert(0, str(REPO / "configs"))
import demo as demo_config  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo_data")
  demo.write_demo_data(root, seed=0, sizes=demo.DemoSizes(
      image=(16, 8), video=(4, 2), audiocaps=(4, 2), clotho=(2, 2), pc=(16, 8), discrn=(2, 2)))
  return root


def _config(root, steps):
  c = demo_config.get_config()
  c.data.root = str(root)
  c.data.modalities = ("image", "pc")
  c.data.train_datasets = ("image_qa", "pc_qa")
  c.data.eval_datasets = ("image_qa", "discrn_image_pc")
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.eval.num_examples = 4
  c.eval.max_new_tokens = 3
  c.model.demo_llm.steps = 10
  c.train.num_steps = steps
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  return c


def test_demo_trains_checkpoints_and_resumes(demo_root, tmp_path):
  workdir = tmp_path / "run"
  first = train_and_evaluate(_config(demo_root, steps=2), workdir)
  assert first["steps"] == 2 and first["first_loss"] > 0
  assert (workdir / "checkpoints" / "2").is_dir()
  second = train_and_evaluate(_config(demo_root, steps=4), workdir)  # resumes at step 2
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary == json.loads(json.dumps(second))
  assert [row["step"] for row in summary["history"]] == [1, 2, 3, 4]
  assert set(summary["eval"]) == {"image_qa", "discrn_image_pc"}
  for metrics in summary["eval"].values():
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_examples"] > 0
  assert "image_qa" in summary["data"]["bad_records"]
  preds = json.loads((workdir / "predictions" / "image_qa.json").read_text())
  assert preds and all("prediction" in p and p["answers"] for p in preds)


def test_unknown_config_field_is_named(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "xblip_jax.main", "--config", str(REPO / "configs" / "demo.py"),
       "--workdir", str(tmp_path), "--config.trian.num_steps=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "trian" in proc.stderr
