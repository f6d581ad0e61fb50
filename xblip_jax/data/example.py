"""The in-memory record that dataset readers yield, and the errors the data pipeline catches.

An `Example` holds paths and raw text only; media are decoded later, inside the Grain pipeline,
so that a list of examples stays small and cheap to shuffle, slice and checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

MODALITIES = ("image", "video", "audio", "pc")
TASKS = ("caption", "qa", "classification", "discrn")


class MediaError(Exception):
  """A media file that is missing, truncated, corrupt or holds unusable values."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


class RecordError(Exception):
  """An annotation record that cannot become a training example (missing or bad field)."""

  def __init__(self, reason: str, record_id: str = ""):
    self.reason = reason
    self.record_id = record_id
    super().__init__(f"{record_id}: {reason}" if record_id else reason)


@dataclasses.dataclass(frozen=True)
class Example:
  """One sample: which media to load and what text goes with it.

  Attributes:
    id: identifier unique within its dataset (question id, file stem, uid, ...).
    modality: "image" | "video" | "audio" | "pc", or a tuple of them for multi-input tasks
      (DisCRn: entity 0 in modality[0], entity 1 in modality[1]).
    media: path of the media file, or one path per modality (same order as `modality`).
    task: "caption" | "qa" | "classification" | "discrn".
    text_input: the raw question (qa, discrn) or "" (caption, classification) as read from
      the annotation; `templates.instruct` turns it into the instruction.
    text_output: the target: a caption, an answer or a class label; a tuple holds several
      candidates (COCO/Clotho references, VQA answers) of which one is drawn per visit.
    answers: accepted answers for evaluation (VQA, DisCRn); empty for training.
    label: class label for classification / DisCRn (0 = first, 1 = second); None otherwise.
    dataset: name of the dataset it came from (for logs and per-dataset metrics).
    meta: anything else a reader keeps (start time, own caption for yes/no questions, ...).
  """

  id: str
  modality: str | tuple[str, ...]
  media: str | tuple[str, ...]
  task: str
  text_input: str = ""
  text_output: str | tuple[str, ...] = ""
  answers: tuple[str, ...] = ()
  label: int | str | None = None
  dataset: str = ""
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    mods = self.modalities
    paths = self.media_paths
    if len(mods) != len(paths):
      raise ValueError(f"{self.id}: {len(mods)} modalities but {len(paths)} media paths")
    for m in mods:
      if m not in MODALITIES:
        raise ValueError(f"{self.id}: unknown modality {m!r} (expected one of {MODALITIES})")
    if self.task not in TASKS:
      raise ValueError(f"{self.id}: unknown task {self.task!r} (expected one of {TASKS})")

  @property
  def modalities(self) -> tuple[str, ...]:
    return (self.modality,) if isinstance(self.modality, str) else tuple(self.modality)

  @property
  def media_paths(self) -> tuple[str, ...]:
    return (self.media,) if isinstance(self.media, str) else tuple(self.media)

  def replace(self, **changes: Any) -> Example:
    return dataclasses.replace(self, **changes)


class Examples(list):
  """A list of `Example`s that also says how many records were skipped, and why.

  Attributes:
    skipped: reason -> number of annotation records that a reader left out.
  """

  def __init__(self, items: Sequence[Example] = (), skipped: Mapping[str, int] | None = None):
    super().__init__(items)
    self.skipped: collections.Counter[str] = collections.Counter(skipped or {})

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def __repr__(self) -> str:
    return f"Examples({len(self)} examples, skipped={dict(self.skipped)})"
