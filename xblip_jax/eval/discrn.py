"""DisCRn (discriminatory cross-modal reasoning) answers and their scorer (LAVIS `discrn_qa`).

The model answers which of two inputs fits a question. An example is correct when its
normalised answer is one of the accepted strings for the right entity, or holds one as a whole
space-separated word (then that word is the answer). Accepted strings are compared as given
(LAVIS normalises the prediction only), so entries such as "the first option." or "A." can
only match through a single word of theirs; number words become digits ("one" -> "1") and
articles disappear on the prediction side.
"""

from __future__ import annotations

from typing import Sequence

from xblip_jax.eval import vqa

# Accepted answers per label, after the modality name of that entity (LAVIS data, verbatim).
FIRST = ("the first option.", "the first", "left one", "(a) left", "(a) left one", "(a)", "a.",
         "A.", "a)", "(A)", "Input A", "Entity 1", "Object 1", "Entity A", "Object A", "left",
         "first", "1st", "input 1", "1", "a", "input a", "the first", "the left one")
SECOND = ("the second option.", "the second.", "second option", "the second option",
          "second option.", "right one", "(b) right", "(b) right one", "(b)", "b)", "Input B",
          "right", "second", "2nd", "input 2", "2", "b", "input b", "Object 2", "Entity B",
          "Object B", "the second", "the right one", "the second one")
# Extra names of a modality when it is the answer.
SYNONYMS = {"pc": ("3d", "3d model", "model", "rendering", "a 3d", "a 3d model"),
            "image": ("photo", "picture"), "audio": ("sound",)}


def accepted_answers(modalities: Sequence[str], label: int) -> list[str]:
  """The accepted answers of an example whose entity `label` (0 or 1) is right."""
  if label not in (0, 1) or len(modalities) != 2:
    raise ValueError(f"DisCRn compares two entities; got modalities {modalities}, label {label}")
  modality = modalities[label]
  return [modality, *(FIRST if label == 0 else SECOND), *SYNONYMS.get(modality, ())]


def resolve(prediction: str, answers: Sequence[str]) -> str:
  """The prediction as scored: normalised, or the first accepted answer among its words."""
  pred = vqa.normalize_answer(prediction)
  words = pred.strip().split(" ")
  return next((a for a in answers if a in words), pred)


def discrn_correct(prediction: str, answers: Sequence[str]) -> float:
  return float(resolve(prediction, answers) in answers)
