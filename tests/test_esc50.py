"""ESC-50 reader: the release's CSV layout, class names by target with `_` -> space, bad rows
skipped and counted; registered as the reference's evaluation split."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf

from xblip_jax.data import registry
from xblip_jax.data.formats import esc50

HEADER = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def _write(root, rows):
  (root / "audio").mkdir(parents=True, exist_ok=True)
  with (root / "esc50.csv").open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(HEADER)
    w.writerows(rows)
  for row in rows:
    if row[0]:
      sf.write(str(root / "audio" / row[0]), np.zeros(800, np.float32) + 0.1, 16000)
  return root / "esc50.csv"


ROWS = [("1-100032-A-0.wav", 1, 0, "dog", True, 100032, "A"),
        ("1-100038-A-14.wav", 1, 14, "chirping_birds", False, 100038, "A"),
        ("2-101-B-1.wav", 2, 1, "rooster", False, 101, "B"),
        ("3-5-A-14.wav", 3, 14, "chirping_birds", False, 5, "A")]


def test_reads_clips_with_class_names_ordered_by_target(tmp_path):
  path = _write(tmp_path, ROWS + [("", 4, 0, "dog", True, 7, "A"),        # no filename
                                  ("4-9-A-0.wav", 4, "x", "dog", True, 9, "A")])  # bad target
  out = esc50.read_esc50(path, tmp_path / "audio", dataset="esc50_cls_val")
  assert [e.id for e in out] == [r[0] for r in ROWS]
  assert out.skipped == {"missing field 'filename'": 1, "bad field 'fold'/'target'": 1}
  names = ("dog", "rooster", "chirping birds")
  for ex, row in zip(out, ROWS):
    assert ex.modalities == ("audio",) and ex.task == "classification"
    assert ex.media == str(tmp_path / "audio" / row[0])
    assert ex.label == ex.text_output == ex.answers[0] == row[3].replace("_", " ")
    assert ex.meta["classnames"] == names
    assert names[ex.meta["target"]] == ex.label and ex.meta["fold"] == row[1]


def test_a_target_with_two_names_is_an_error(tmp_path):
  path = _write(tmp_path, ROWS[:1] + [("x.wav", 1, 0, "cat", False, 1, "A")])
  with pytest.raises(ValueError, match="target 0"):
    esc50.read_esc50(path, tmp_path / "audio")


@pytest.mark.parametrize("name,task", [("esc50_cls_val", "esc50"),
                                       ("esc50_completion_val", "esc50_gen")])
def test_registered_eval_splits(tmp_path, name, task):
  _write(tmp_path / "ESC-50", ROWS)
  found = registry.resolve(name, tmp_path, where="data.eval_datasets")
  assert found.entry.eval_task == task and found.entry.split == "val"
  examples = registry.read(found)
  assert len(examples) == len(ROWS) and examples[0].dataset == name
