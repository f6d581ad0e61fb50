"""Answer normalisation and exact-match accuracy for open-ended answers.

Normalisation follows the spirit of the VQA evaluation: lower case, punctuation removed,
articles dropped, whitespace collapsed. The paper's full scorers live in `eval/scorers`.
"""

from __future__ import annotations

import re
import string
from typing import Iterable, Mapping

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
  words = _PUNCT.sub(" ", text.lower()).split()
  return " ".join(w for w in words if w not in _ARTICLES)


def is_correct(prediction: str, answers: Iterable[str]) -> bool:
  return normalize(prediction) in {normalize(a) for a in answers}


def score(preds: list[Mapping]) -> dict[str, float]:
  """Accuracy over predictions that carry `answers`, overall and per task."""
  scored = [p for p in preds if p.get("answers")]
  if not scored:
    return {"num_examples": len(preds)}
  out = {"accuracy": sum(is_correct(p["prediction"], p["answers"]) for p in scored) / len(scored),
         "num_examples": len(scored)}
  for task in sorted({p.get("task", "") for p in scored} - {""}):
    rows = [p for p in scored if p.get("task") == task]
    out[f"accuracy/{task}"] = sum(is_correct(p["prediction"], p["answers"]) for p in rows) / len(rows)
  return out
