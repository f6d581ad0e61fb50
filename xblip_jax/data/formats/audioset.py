"""AudioSet segments as a classification instruction set.

Annotation: AudioSet's segment CSV (`balanced_train_segments.csv`; the reference trains on a
cleaned copy, `balanced_train_clean.csv`): comment lines starting with `#`, then rows
`YTID, start_seconds, end_seconds, "mid1,mid2,..."` (spaces after commas); plus
`class_labels_indices.csv` (`index,mid,display_name`) mapping mids to names. The audio is
`{audio_root}/{YTID}_{start:.1f}-{end:.1f}.wav`. Each example's `text_output` holds the
segment's label names; `templates.instruct` draws one per visit and makes the target sentence
("i hear a dog"), as the reference's `blip_instruction` classification task.

The reference keeps a segment when `file_name.split('_')[0]` of some file in the audio folder
equals its YTID, which drops every YouTube id containing "_"; here the exact file is checked
(`require_media=True`).
"""

from __future__ import annotations

import csv
import os

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, read_records


def audio_filename(ytid: str, start: str | float, end: str | float) -> str:
  """`{YTID}_{start:.1f}-{end:.1f}.wav`, the reference's AudioSet clip name."""
  try:
    return f"{ytid}_{float(start):.1f}-{float(end):.1f}.wav"
  except ValueError:
    raise RecordError("bad field 'start_seconds'/'end_seconds'") from None


def read_segments(csv_path: str | os.PathLike) -> list[dict[str, str]]:
  """Rows of an AudioSet segment CSV (comment lines and a header row are skipped)."""
  keys = ("YTID", "start_seconds", "end_seconds", "positive_labels")
  with open(csv_path, newline="", encoding="utf-8") as f:
    rows = csv.reader((line for line in f if not line.lstrip().startswith("#")),
                      skipinitialspace=True)
    return [dict(zip(keys, row)) for row in rows if row and row[0] != "YTID"]


def read_label_names(csv_path: str | os.PathLike) -> dict[str, str]:
  """mid -> display name, from `class_labels_indices.csv`."""
  return {str(r["mid"]): str(r["display_name"]) for r in read_records(csv_path)}


def read_audioset(segments_csv: str | os.PathLike, labels_csv: str | os.PathLike,
                  audio_root: str | os.PathLike, *, dataset: str = "audioset",
                  require_media: bool = True) -> Examples:
  """Classification examples, one per segment; `label` keeps the label names too."""
  names = read_label_names(labels_csv)

  def to_example(i, rec):
    ytid = str(field(rec, "YTID"))
    mids = [m.strip() for m in str(field(rec, "positive_labels")).split(",") if m.strip()]
    unknown = [m for m in mids if m not in names]
    if unknown or not mids:
      raise RecordError("unknown label mid")
    labels = tuple(names[m] for m in mids)
    name = audio_filename(ytid, field(rec, "start_seconds"), field(rec, "end_seconds"))
    return Example(id=f"{ytid}_{rec['start_seconds']}", modality="audio",
                   media=os.path.join(audio_root, name), task="classification",
                   text_output=labels, label=", ".join(labels), dataset=dataset,
                   meta={"youtube_id": ytid})
  return build(read_segments(segments_csv), to_example, dataset=dataset,
               require_media=require_media)
