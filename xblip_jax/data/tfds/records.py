"""One TFDS record per `Example`: its fields as JSON, and the bytes of each media file.

JSON has no tuples, and `Example` fields and reader `meta` use them (reference lists, pairs of
DisCRn ids): tuples are tagged so that a record reads back as an equal `Example`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from xblip_jax.data.example import Example

_TUPLE = "__tuple__"


@dataclasses.dataclass(frozen=True)
class ShardExample(Example):
  """An `Example` read from shards: `media` keeps the original paths (for logs), and
  `media_bytes` holds each file's content, in the same order."""

  media_bytes: tuple[bytes, ...] = ()


def _encode(value: Any) -> Any:
  if isinstance(value, tuple):
    return {_TUPLE: [_encode(v) for v in value]}
  if isinstance(value, list):
    return [_encode(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _encode(v) for k, v in value.items()}
  return value


def _decode(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {_TUPLE}:
      return tuple(_decode(v) for v in value[_TUPLE])
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode(v) for v in value]
  return value


def annotation_json(example: Example) -> str:
  """The `Example`'s fields (not media bytes) as JSON."""
  fields = {f.name: getattr(example, f.name) for f in dataclasses.fields(Example)}
  return json.dumps(_encode(fields), ensure_ascii=False, sort_keys=True)


def to_record(example: Example, blobs: tuple[bytes, ...]) -> dict[str, Any]:
  """The TFDS feature dict of one example (see `builders.FEATURES`)."""
  if len(blobs) != len(example.media_paths):
    raise ValueError(f"{example.id}: {len(example.media_paths)} media paths, {len(blobs)} blobs")
  return {"annotation": annotation_json(example), "media": list(blobs)}


def _text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def from_record(record: Mapping[str, Any]) -> ShardExample:
  """The `ShardExample` of a record read with `as_data_source()`."""
  fields = _decode(json.loads(_text(record["annotation"])))
  return ShardExample(**fields, media_bytes=tuple(bytes(b) for b in record["media"]))
