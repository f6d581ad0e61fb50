"""Media bytes from shards become short-lived local files for the decoders.

The decoders (`preprocess/*`) read paths: FFmpeg, soundfile, PIL and NumPy pick the format by
name or content, and some check sizes on disk. Writing a record's bytes to a file in
`/dev/shm` (RAM) for the duration of one `load_media` call keeps every decoder exactly as it
is for raw files, at the cost of one small memory copy; errors name the original path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator

from xblip_jax.data.example import Example, MediaError


@functools.cache  # once per process: it sits on the per-record decode path
def _staging_dir() -> str | None:
  shm = "/dev/shm"
  return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None  # None: $TMPDIR


@contextlib.contextmanager
def staged_media(example: Example) -> Iterator[Example]:
  """Yields `example` itself, or for a `ShardExample` a copy whose media are local files
  holding its bytes (removed on exit). A `MediaError` names the original path."""
  blobs = getattr(example, "media_bytes", ())
  if not blobs:
    yield example
    return
  originals = example.media_paths
  local: list[str] = []
  try:
    for name, blob in zip(originals, blobs, strict=True):
      fd, path = tempfile.mkstemp(prefix="xblip_", suffix=os.path.splitext(name)[1],
                                  dir=_staging_dir())
      local.append(path)
      with os.fdopen(fd, "wb") as f:
        f.write(blob)
    media = local[0] if isinstance(example.media, str) else tuple(local)
    try:
      yield example.replace(media=media, media_bytes=())
    except MediaError as e:
      original = originals[local.index(e.path)] if e.path in local else e.path
      raise MediaError(original, e.reason) from None
  finally:
    for path in local:
      with contextlib.suppress(OSError):
        os.unlink(path)
