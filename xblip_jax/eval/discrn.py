"""DisCRn (discriminatory cross-modal reasoning) scorer (LAVIS `discrn_qa`).

The model answers which of two inputs fits a question. An example is correct when its
normalised answer is one of the accepted strings for the right entity, or holds one as a whole
space-separated word (then that word is the answer). Accepted strings are compared as given
(LAVIS normalises the prediction only), so entries such as "the first option." or "A." can
only match through a single word of theirs; number words become digits ("one" -> "1") and
articles disappear on the prediction side. The accepted strings themselves come with the
examples (`data.formats.discrn.accepted_answers`).
"""

from __future__ import annotations

from typing import Sequence

from xblip_jax.eval import vqa


def resolve(prediction: str, answers: Sequence[str]) -> str:
  """The prediction as scored: normalised, or the first accepted answer among its words."""
  pred = vqa.normalize_answer(prediction)
  words = pred.strip().split(" ")
  return next((a for a in answers if a in words), pred)


def discrn_correct(prediction: str, answers: Sequence[str]) -> float:
  return float(resolve(prediction, answers) in answers)
