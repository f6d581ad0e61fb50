"""Readers of the on-disk annotation formats the reference trains and evaluates on.

Each family module (`coco`, `msrvtt`, `audiocaps`, `clotho`, `objaverse`, `discrn`) turns an
annotation file into `Examples`. The helpers here load CSV / TSV / JSON / JSONL records the way
LAVIS' `BaseDataset` does, and build examples record by record: a record that lacks a field,
or (with `require_media`) whose media file does not exist, is left out and counted by reason.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from xblip_jax.data.example import Example, Examples, RecordError

log = logging.getLogger(__name__)

Record = Mapping[str, Any]


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of an annotation file as dicts.

  `.csv` / `.tsv`: one dict per row keyed by the header. `.jsonl`: one object per line. `.json`:
  a list of objects, or a dict turned into `{"sample_id": key, **value}` (or
  `{"sample_id": key, "data": value}` when the value is not a dict), as LAVIS does.
  """
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix in (".csv", ".tsv"):
    with path.open(newline="", encoding="utf-8") as f:
      return [dict(row) for row in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
  with path.open(encoding="utf-8") as f:
    if suffix == ".jsonl":
      return [json.loads(line) for line in f if line.strip()]
    loaded = json.load(f)
  if isinstance(loaded, list):
    return loaded
  if isinstance(loaded, dict):
    return [{"sample_id": k, **v} if isinstance(v, dict) else {"sample_id": k, "data": v}
            for k, v in loaded.items()]
  raise ValueError(f"{path}: expected a JSON list or dict, got {type(loaded).__name__}")


def is_missing(value: Any) -> bool:
  """None, NaN (an empty pandas cell), an empty string or an empty list."""
  if value is None:
    return True
  if isinstance(value, float) and math.isnan(value):
    return True
  if isinstance(value, str):
    return not value.strip()
  if isinstance(value, (list, tuple)):
    return len(value) == 0
  return False


def field(record: Record, name: str) -> Any:
  """`record[name]`, or a `RecordError` naming the field when it is absent or empty."""
  value = record.get(name)
  if is_missing(value):
    raise RecordError(f"missing field '{name}'")
  return value


def first_field(record: Record, names: Iterable[str]) -> Any:
  """The first present field among `names` (alternative column names of one format)."""
  names = tuple(names)
  for name in names:
    if not is_missing(record.get(name)):
      return record[name]
  raise RecordError(f"missing field '{names[0]}'")


def text_list(value: Any) -> tuple[str, ...]:
  """A string or a list of strings as a tuple of non-empty strings."""
  items = [value] if isinstance(value, str) else list(value)
  out = tuple(str(v) for v in items if not is_missing(v))
  if not out:
    raise RecordError("empty text")
  return out


def one_or_many(value: Any) -> str | tuple[str, ...]:
  """A single string stays a string (one target); a list becomes a tuple (references)."""
  items = text_list(value)
  return items[0] if isinstance(value, str) else items


def build(records: Iterable[Record], to_example: Callable[[int, Record], Example], *,
          dataset: str, require_media: bool = False) -> Examples:
  """Examples from records; records that raise `RecordError` are skipped and counted.

  Args:
    records: annotation rows.
    to_example: `(index, record) -> Example`; raises `RecordError` for an unusable record.
    dataset: name for the log line.
    require_media: also skip (and count) examples whose media files do not exist; otherwise
      missing files surface later as `MediaError` in the pipeline.
  """
  out = Examples()
  for i, record in enumerate(records):
    try:
      example = to_example(i, record)
    except RecordError as e:
      out.skipped[e.reason] += 1
      continue
    if require_media and not all(os.path.exists(p) for p in example.media_paths):
      out.skipped["missing media file"] += 1
      continue
    out.append(example)
  if out.skipped:
    log.warning("%s: kept %d records, skipped %s", dataset, len(out), dict(out.skipped))
  return out
