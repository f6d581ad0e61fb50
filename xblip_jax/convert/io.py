"""Reading and writing PyTorch-side checkpoint files, one tensor at a time.

Sources are read lazily so that a conversion holds at most one source tensor at a time:

* safetensors (one file, or a folder with `model.safetensors.index.json`): the header is parsed
  here and each tensor is read with one `readinto` into a fresh array (no mmap, so a tensor's
  pages are freed once the converter drops it). Every header is checked against the file size
  when the source is opened, so a truncated file fails before anything is converted.
* PyTorch pickles (`.pth`, `.pt`, `pytorch_model*.bin`, sharded `pytorch_model.bin.index.json`):
  `torch.load(weights_only=True, mmap=True)`, falling back to a plain load for the legacy
  (non-zip) format.

Writers produce sharded safetensors folders (streamed: header first, then tensor by tensor) and
`torch.save` files.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np


class CheckpointFileError(ValueError):
  """A checkpoint file cannot be read: missing, truncated, or not the expected format."""


_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class Source:
  """A read-only, lazily loaded state dict: `keys()`, `shape(k)`, `dtype(k)`, `read(k)`."""

  description: str = ""

  def keys(self) -> list[str]:
    raise NotImplementedError

  def shape(self, key: str) -> tuple[int, ...]:
    raise NotImplementedError

  def dtype(self, key: str) -> np.dtype:
    raise NotImplementedError

  def read(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def __contains__(self, key: str) -> bool:
    return key in self._key_set()

  def _key_set(self) -> set[str]:
    if not hasattr(self, "_keys_cache"):
      self._keys_cache = set(self.keys())
    return self._keys_cache


# ------------------------------------------------------------------------------- safetensors


def _read_st_header(path: Path) -> tuple[int, dict[str, dict]]:
  """(data start offset, tensor entries) of one safetensors file, checked against its size."""
  size = path.stat().st_size
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise CheckpointFileError(f"{path}: truncated safetensors file (header of {n} bytes, "
                                f"file has {size})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointFileError(f"{path}: not a safetensors file ({e})") from None
  header.pop("__metadata__", None)
  start = 8 + n
  for key, entry in header.items():
    if entry.get("dtype") not in _ST_DTYPES:
      raise CheckpointFileError(f"{path}: tensor {key} has unsupported dtype {entry.get('dtype')}")
    begin, end = entry["data_offsets"]
    itemsize = np.dtype(_ST_DTYPES[entry["dtype"]]).itemsize
    want = int(np.prod(entry["shape"], dtype=np.int64)) * itemsize
    if end - begin != want:
      raise CheckpointFileError(f"{path}: tensor {key} spans {end - begin} bytes, its shape "
                                f"{tuple(entry['shape'])} {entry['dtype']} needs {want}")
    if start + end > size:
      raise CheckpointFileError(f"{path}: truncated: tensor {key} needs bytes up to "
                                f"{start + end}, the file has {size}")
  return start, header


class SafetensorsSource(Source):
  """One safetensors file or a sharded set (`*.safetensors.index.json`)."""

  def __init__(self, files: Sequence[Path], description: str):
    self.description = description
    self._where: dict[str, tuple[Path, int, dict]] = {}
    for path in files:
      if not path.is_file():
        raise CheckpointFileError(f"{path}: file not found ({description})")
      start, header = _read_st_header(path)
      for key, entry in header.items():
        if key in self._where:
          raise CheckpointFileError(f"{key} appears in both {self._where[key][0]} and {path}")
        self._where[key] = (path, start, entry)

  def keys(self):
    return list(self._where)

  def shape(self, key):
    return tuple(self._where[key][2]["shape"])

  def dtype(self, key):
    return np.dtype(_ST_DTYPES[self._where[key][2]["dtype"]])

  def read(self, key):
    path, start, entry = self._where[key]
    out = np.empty(tuple(entry["shape"]), self.dtype(key))
    begin, end = entry["data_offsets"]
    with path.open("rb") as f:
      f.seek(start + begin)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != end - begin:
      raise CheckpointFileError(f"{path}: truncated while reading {key}")
    return out


# ----------------------------------------------------------------------------------- PyTorch


def torch_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor as numpy (bfloat16 through an int16 view); shares memory when it can."""
  import torch  # pylint: disable=import-outside-toplevel

  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_torch(x: np.ndarray):
  import torch  # pylint: disable=import-outside-toplevel

  x = np.ascontiguousarray(x)
  if x.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(x)


def torch_load(path: str | Path, *, trust_pickle: bool = False) -> Any:
  """`torch.load` on CPU, weights only (unless trusted), memory-mapped where the format allows."""
  import torch  # pylint: disable=import-outside-toplevel

  path = Path(path)
  if not path.is_file():
    raise CheckpointFileError(f"{path}: file not found")
  kw = dict(map_location="cpu", weights_only=not trust_pickle)
  try:
    try:
      return torch.load(path, mmap=True, **kw)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      return torch.load(path, **kw)  # legacy (pre-zip) format cannot be memory-mapped
  except pickle.UnpicklingError as e:
    raise CheckpointFileError(
        f"{path}: refused by torch.load(weights_only=True): {str(e).splitlines()[0]}; pass "
        "--trust-pickle only for a file you trust") from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise CheckpointFileError(f"{path}: cannot read as a PyTorch checkpoint (truncated or "
                              f"corrupt?): {type(e).__name__}: {str(e).splitlines()[0]}") from None


def select_state_dict(obj: Any, path: str | Path, key: str | None = None) -> dict[str, Any]:
  """The tensor dict inside a loaded checkpoint: `obj[key]`, else `model`/`state_dict`, else obj."""
  import torch  # pylint: disable=import-outside-toplevel

  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      have = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
      raise CheckpointFileError(f"{path}: no entry {key!r} (has {have})")
    obj = obj[key]
  elif isinstance(obj, Mapping):
    for name in ("model", "state_dict"):
      if isinstance(obj.get(name), Mapping):
        obj = obj[name]
        break
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class TorchSource(Source):
  """Tensors of one or more loaded torch state dicts (already selected), optional prefix strip."""

  def __init__(self, state_dicts: Sequence[Mapping[str, Any]], description: str,
               strip_prefix: str = ""):
    self.description = description
    self._tensors: dict[str, Any] = {}
    for sd in state_dicts:
      for k, v in sd.items():
        if strip_prefix and k.startswith(strip_prefix):
          k = k[len(strip_prefix):]
        if k in self._tensors:
          raise CheckpointFileError(f"{description}: key {k} appears twice")
        self._tensors[k] = v

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return tuple(self._tensors[key].shape)

  def dtype(self, key):
    return torch_to_numpy(self._tensors[key].new_empty(0)).dtype

  def read(self, key):
    return np.array(torch_to_numpy(self._tensors[key]), copy=True)


def open_source(path: str | Path, *, key: str | None = None, strip_prefix: str = "",
                trust_pickle: bool = False) -> Source:
  """A lazy source for a file or an HF-style folder (safetensors preferred over .bin)."""
  path = Path(path)
  if path.is_dir():
    for index, kind in (("model.safetensors.index.json", "st"), ("model.safetensors", "st"),
                        ("pytorch_model.bin.index.json", "pt"), ("pytorch_model.bin", "pt")):
      if (path / index).is_file():
        return open_source(path / index, key=key, strip_prefix=strip_prefix,
                           trust_pickle=trust_pickle)
    raise CheckpointFileError(f"{path}: no model.safetensors[.index.json] or "
                              "pytorch_model.bin[.index.json] in this folder")
  if not path.is_file():
    raise CheckpointFileError(f"{path}: file not found")
  files: list[Path] = [path]
  if path.name.endswith(".index.json"):
    try:
      weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointFileError(f"{path}: not a sharded-checkpoint index ({e})") from None
    files = [path.parent / f for f in dict.fromkeys(weight_map.values())]
  if files[0].suffix == ".safetensors":
    src = SafetensorsSource(files, str(path))
    if strip_prefix:
      raise CheckpointFileError("prefix stripping applies to PyTorch pickles only")
    return src
  dicts = [select_state_dict(torch_load(f, trust_pickle=trust_pickle), f, key) for f in files]
  return TorchSource(dicts, str(path), strip_prefix=strip_prefix)


# ----------------------------------------------------------------------------------- writers


def parse_size(text: str | int) -> int:
  """'5GB', '200MB', '10KB' or bytes -> bytes (decimal units, as transformers)."""
  if isinstance(text, int):
    return text
  units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
  t = text.strip().upper()
  for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
    if t.endswith(unit):
      return int(float(t[:-len(unit)]) * mult)
  return int(t)


def shard_items(items: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int
                ) -> Iterator[dict[str, np.ndarray]]:
  """Groups (key, array) pairs into dicts of at most `max_shard_bytes` (a bigger array alone)."""
  shard: dict[str, np.ndarray] = {}
  size = 0
  for key, arr in items:
    if shard and size + arr.nbytes > max_shard_bytes:
      yield shard
      shard, size = {}, 0
    shard[key] = arr
    size += arr.nbytes
  if shard:
    yield shard


def _write_st_file(path: Path, tensors: Mapping[str, np.ndarray],
                   metadata: Mapping[str, str]) -> int:
  header: dict[str, Any] = {"__metadata__": dict(metadata)}
  offset = 0
  for key, arr in tensors.items():
    if np.dtype(arr.dtype) not in _ST_NAMES:
      raise ValueError(f"{key}: dtype {arr.dtype} has no safetensors name")
    header[key] = {"dtype": _ST_NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
  with path.open("wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
      f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
  return offset


def write_safetensors(folder: str | Path, shards: Iterable[Mapping[str, np.ndarray]], *,
                      metadata: Mapping[str, str] | None = None) -> list[Path]:
  """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
  `model.safetensors.index.json`, one shard at a time as `shards` yields them.

  `metadata` is the header's `__metadata__` (transformers expects {"format": "pt"}).
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  metadata = dict(metadata or {"format": "pt"})
  tmp_paths, keys, total = [], [], 0
  for i, shard in enumerate(shards):
    path = folder / f".shard-{i:05d}.tmp"
    total += _write_st_file(path, shard, metadata)
    tmp_paths.append(path)
    keys.append(list(shard))
  n = len(tmp_paths)
  names = (["model.safetensors"] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  paths = []
  for tmp, name in zip(tmp_paths, names):
    os.replace(tmp, folder / name)
    paths.append(folder / name)
  if n > 1:
    weight_map = {k: name for name, ks in zip(names, keys) for k in ks}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return paths


def write_torch(path: str | Path, state_dict: Mapping[str, np.ndarray], *,
                wrap: str | None = "model", extra: Mapping[str, Any] | None = None) -> None:
  """`torch.save` of the arrays as tensors (sharing memory), optionally as `{wrap: sd, **extra}`."""
  import torch  # pylint: disable=import-outside-toplevel

  sd = {k: numpy_to_torch(v) for k, v in state_dict.items()}
  obj: Any = sd if wrap is None else {wrap: sd, **dict(extra or {})}
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  torch.save(obj, tmp)
  os.replace(tmp, path)


def iter_chunks(keys: Sequence[str], nbytes: Callable[[str], int], limit: int
                ) -> Iterator[list[str]]:
  """Groups keys into runs of at most `limit` bytes (a bigger key alone)."""
  chunk, size = [], 0
  for k in keys:
    b = nbytes(k)
    if chunk and size + b > limit:
      yield chunk
      chunk, size = [], 0
    chunk.append(k)
    size += b
  if chunk:
    yield chunk
