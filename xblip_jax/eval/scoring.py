"""Scores one evaluation set's predictions with its task's metric; per example and overall.

Every prediction row is a dict with `prediction` and `answers` (references: human answers,
captions, DisCRn's accepted answers, or the class name; classification rows' `prediction` is
the class name the trainer's `evaluate` ranked or matched in the generated text). Rows get a `score` field; the set's
metrics are averages (captioning: the corpus-level COCO metrics). `agg_metrics` is the task's
headline number, the one LAVIS selects models by. QA and DisCRn sets also keep the project's
earlier loose `accuracy` (`eval/answers.py`) next to the reference metric.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from xblip_jax.eval import answers as answers_lib
from xblip_jax.eval import captioning, classification, discrn, vqa
from xblip_jax.eval.tasks import Task

# The metric name reported for each task kind (the key `results.md` shows).
HEADLINE = {"caption": "CIDEr", "vqa": "vqa_acc", "gqa": "gqa_acc", "discrn": "discrn_acc",
            "class_rank": "class_acc", "class_gen": "class_acc"}


def postprocess(task: Task, text: str) -> str:
  text = text.strip()
  return text or (task.empty_answer or "")


def score_set(task: Task, preds: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Adds `score` to each row of `preds` (in place); returns the set's metrics."""
  rows = [p for p in preds if p.get("answers")]
  if not rows:
    return {"num_examples": 0}
  head = HEADLINE[task.metric]
  if task.metric == "caption":
    metrics, per = captioning.score_captions(
        {str(i): p["prediction"] for i, p in enumerate(rows)},
        {str(i): list(p["answers"]) for i, p in enumerate(rows)})
    for i, p in enumerate(rows):
      p["score"] = per[str(i)]
    return {**metrics, "num_examples": len(rows)}
  if task.metric == "vqa":
    one = lambda p: vqa.vqa_accuracy(p["prediction"], p["answers"])
  elif task.metric == "gqa":
    one = lambda p: vqa.gqa_match(p["prediction"], p["answers"][0])
  elif task.metric == "discrn":
    one = lambda p: discrn.discrn_correct(p["prediction"], p["answers"])
  else:  # class_rank / class_gen: rows carry the predicted class name (ranked or matched)
    one = lambda p: float(p["prediction"] == p["answers"][0])
  for p in rows:
    p["score"] = one(p)
  metrics = {head: float(np.mean([p["score"] for p in rows])), "num_examples": len(rows)}
  metrics["agg_metrics"] = metrics[head]
  if task.metric in ("vqa", "gqa", "discrn"):
    loose = answers_lib.score(rows)
    metrics.update({k: v for k, v in loose.items() if k != "num_examples"})
  return metrics
