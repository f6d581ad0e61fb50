"""Clotho captions and ClothoAQA, as CSV files with WAV audio.

Clotho v1/v2 (`clotho_captions_{development,validation,evaluation}.csv`):
`file_name,caption_1,...,caption_5`, audio at `{audio_root}/{file_name}` (the reference joins
the split name in between: pass the split folder as `audio_root`). ClothoAQA
(`clotho_aqa_{split}.csv`): `file_name,QuestionText,answer`, three consecutive rows per question
(three annotators).
"""

from __future__ import annotations

import os

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, read_records

CAPTION_KEYS = tuple(f"caption_{k}" for k in range(1, 6))


def read_clotho(csv_path: str | os.PathLike, audio_root: str | os.PathLike, *,
                dataset: str = "clotho", require_media: bool = False) -> Examples:
  """One example per file; `text_output` holds its five captions (one is drawn per visit in
  training, as the reference does; all five are the references in evaluation)."""
  def to_example(i, rec):
    name = str(field(rec, "file_name"))
    captions = tuple(str(field(rec, k)) for k in CAPTION_KEYS)
    return Example(id=name, modality="audio", media=os.path.join(audio_root, name),
                   task="caption", text_output=captions, dataset=dataset)
  return build(read_records(csv_path), to_example, dataset=dataset, require_media=require_media)


def read_clotho_aqa(csv_path: str | os.PathLike, audio_root: str | os.PathLike, *,
                    dataset: str = "clotho_aqa", require_media: bool = False) -> Examples:
  """One example per question: its three annotators' answers in `answers`; `text_output`
  draws among them."""
  rows = read_records(csv_path)
  groups = [rows[i:i + 3] for i in range(0, len(rows), 3)]

  def to_example(i, group):
    if len(group) != 3:
      raise RecordError("incomplete answer group")
    name = str(field(group[0], "file_name"))
    if any(str(r.get("file_name")) != name for r in group):
      raise RecordError("answer group spans files")
    answers = tuple(str(field(r, "answer")) for r in group)
    return Example(id=str(i), modality="audio", media=os.path.join(audio_root, name), task="qa",
                   text_input=str(field(group[0], "QuestionText")), text_output=answers,
                   answers=answers, dataset=dataset)
  return build(groups, to_example, dataset=dataset, require_media=require_media)
