"""ESC-50 environmental sounds as a classification evaluation set.

Layout of the ESC-50 release: `meta/esc50.csv` with columns `filename, fold, target, category,
esc10, src_file, take` (one row per 5 s clip, 50 categories, `target` the class index), and
`audio/{filename}` (WAV, 44.1 kHz mono). The reference's eval yaml keeps the CSV at
`ESC-50/esc50.csv` and the clips at `ESC-50/audio`.

Class names are the categories with `_` turned into spaces ("crying_baby" -> "crying baby"),
as LAVIS' `ESC50` dataset forms them. LAVIS lists them through `set()`, so its order changes
from run to run with Python's string hashing; here they are ordered by `target`, which only
matters for classification by generation (the first class found in the output wins).
"""

from __future__ import annotations

import os

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, read_records


def class_name(category: str) -> str:
  return category.replace("_", " ")


def class_names(records) -> tuple[str, ...]:
  """The class list, ordered by `target`; a target named twice differently is an error."""
  by_target: dict[int, str] = {}
  for rec in records:
    try:
      target, name = int(rec["target"]), class_name(str(rec["category"]))
    except (KeyError, TypeError, ValueError):
      continue  # the record itself is skipped and counted by `read_esc50`
    if by_target.setdefault(target, name) != name:
      raise ValueError(f"ESC-50: target {target} names both {by_target[target]!r} and {name!r}")
  return tuple(by_target[t] for t in sorted(by_target))


def read_esc50(csv_path: str | os.PathLike, audio_root: str | os.PathLike, *,
               dataset: str = "esc50", require_media: bool = False) -> Examples:
  """One classification example per clip: `label` and `answers` hold its class name,
  `meta["classnames"]` the whole class list, `meta["target"]` its index in it. Every fold is
  read: the reference evaluates on all 2,000 clips."""
  records = read_records(csv_path)
  names = class_names(records)

  def to_example(i, rec):
    filename = str(field(rec, "filename"))
    try:
      fold, target = int(field(rec, "fold")), int(field(rec, "target"))
    except ValueError:
      raise RecordError("bad field 'fold'/'target'") from None
    name = class_name(str(field(rec, "category")))
    return Example(id=filename, modality="audio", media=os.path.join(audio_root, filename),
                   task="classification", text_output=name, answers=(name,), label=name,
                   dataset=dataset,
                   meta={"classnames": names, "target": names.index(name), "fold": fold})
  return build(records, to_example, dataset=dataset, require_media=require_media)
