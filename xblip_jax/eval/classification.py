"""Multimodal classification (ESC-50, ModelNet40) by the reference's two methods.

- Ranking (`_predict_class`): every class name, formatted into the candidate template, is
  scored by the LLM as a continuation of the multimodal prompt; the prediction is the class
  with the least summed token NLL (LAVIS averages over padded rows of equal length, which
  ranks like the sum, so longer names are penalised). `rank_candidates` picks it from the
  per-candidate losses; `candidate_nll` (eval/candidate_nll.py) computes them on our model.
- Generation (`predict_with_gen`): the generated text goes through `pre_caption`; the first
  class (in class-list order) equal to one whole word of it is the prediction, else "" (so a
  multi-word class name can never be predicted this way).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from jaxtyping import Float

from xblip_jax.data.templates import pre_caption


def class_from_generation(generated: str, classnames: Sequence[str]) -> str:
  words = pre_caption(generated).split(" ")
  return next((c for c in classnames if c in words), "")


def rank_candidates(losses: Float[np.ndarray, "B C"]) -> np.ndarray:
  """Predicted class index per row: argmin of the summed candidate NLL (first on ties)."""
  return np.argmin(np.asarray(losses), axis=-1)


def accuracy(predicted: Sequence, targets: Sequence) -> float:
  if len(predicted) != len(targets) or not targets:
    raise ValueError("accuracy needs as many predictions as targets, at least one")
  return float(np.mean([p == t for p, t in zip(predicted, targets)]))
