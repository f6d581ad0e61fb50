"""Grain input pipeline: per-dataset decode + preprocess + text encoding, then weighted mixing.

Per dataset (one `DatasetSpec`):
  MapDataset.source(examples) -> shuffle(seed) -> repeat (new order each epoch)
  -> host shard [process_index::process_count] -> map: templates + media + encode_text
  -> to_iter_dataset (threads) -> skip bad records (counted, threshold) -> batch(B).
Then one dataset per batch is drawn with probability proportional to its weight (default
sqrt(size), as the reference's ratios), so a batch has ONE modality and one task.

Sharding comes before decoding, so that a host only decodes its own share. The draw of the
dataset depends on the seed and the batch number only (not on the host): every host picks the
same dataset for the same step, which SPMD training needs (the reference seeds each rank
differently; under DDP that was harmless). Element randomness (crops, frames, templates, FPS
start) comes from `np.random.default_rng([seed, dataset, host, index])`, so an element does not
depend on threads or worker processes. With `num_workers` > 0 each worker runs the pipeline
(batching and mixing included) on a slice of every dataset and batches come round-robin from
the workers: deterministic, but which elements share a batch depends on the worker count.

The iterator is a Grain `DatasetIterator`: `get_state()` / `set_state()` resume exactly (also
with worker processes), and the state holds the bad-record counts (`bad_record_counts`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from xblip_jax.data import templates
from xblip_jax.data.example import Example, MediaError, RecordError
from xblip_jax.data.tfds.staging import staged_media

log = logging.getLogger(__name__)

EncodeText = Callable[[Example], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class MediaOptions:
  """How each modality is decoded and preprocessed (reference defaults)."""

  image_size: int = 224
  n_frms: int = 5                   # video frames (DisCRn audio-video: 2)
  video_hflip_prob: float = 0.5     # 0 for direction-sensitive data (the demo's videos)
  video_reference_quirks: bool = False  # eval: BGR frames + repeated last frame, as LAVIS
  num_clips: int = 2                # audio clips of 512 fbank frames
  frames_per_clip: int = 512
  npoints: int = 8192               # point-cloud points


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset of the mixture.

  Attributes:
    name: key of the dataset (logs, state, bad-record counts).
    examples: what a reader returned.
    weight: mixing weight; None -> sqrt(len(examples)).
    media: decoding options.
    instruct: fill instruction/target with `templates.instruct` on every visit (training);
      False passes `text_input`/`text_output` through as read (evaluation prompts are the
      caller's `encode_text` business).
    binary_qa: the reference's `add_binary` yes/no questions (needs `meta["caption"]`).
    prompt: text put before every template.
  """

  name: str
  examples: Sequence[Example]
  weight: float | None = None
  media: MediaOptions = MediaOptions()
  instruct: bool = True
  binary_qa: bool = False
  prompt: str = ""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Iteration settings shared by all datasets of one pipeline.

  Attributes:
    batch_size: per-host batch size.
    seed: drives shuffling, mixing and every per-element random choice.
    train: random train transforms (else the deterministic eval ones).
    shuffle: shuffle each epoch.
    num_epochs: passes over each dataset; None = forever (mixing needs it: it stops at the
      first exhausted dataset).
    drop_remainder: drop a last partial batch.
    max_bad_fraction: stop with `TooManyBadRecordsError` above this fraction of unusable records
      (per dataset, checked once `min_records_checked` were seen and at the end).
    min_records_checked: records to see before the fraction is checked.
    num_threads: decoding threads per process (`grain.ReadOptions`).
    prefetch_buffer_size: elements the threads read ahead.
    num_workers: worker processes (0: none); each runs the whole pipeline on a slice.
    process_index, process_count: host sharding; None -> `jax.process_index()/count()`.
  """

  batch_size: int
  seed: int = 0
  train: bool = True
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  max_bad_fraction: float = 0.05
  min_records_checked: int = 100
  num_threads: int = 4
  prefetch_buffer_size: int = 16
  num_workers: int = 0
  process_index: int | None = None
  process_count: int | None = None

  @classmethod
  def for_eval(cls, batch_size: int, **overrides: Any) -> PipelineConfig:
    """One ordered pass with the eval transforms, keeping a last partial batch."""
    settings = dict(train=False, shuffle=False, num_epochs=1, drop_remainder=False)
    return cls(batch_size=batch_size, **{**settings, **overrides})


class TooManyBadRecordsError(RuntimeError):
  """More unusable records than `PipelineConfig.max_bad_fraction` allows."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """What the map step yields instead of an element whose media or fields are unusable."""

  reason: str   # short category, the counting key ("file not found", "cannot decode image")
  path: str
  message: str  # full error text, logged once per path


class SkipBadIterDataset(grain.IterDataset):
  """Drops `BadRecord`s, counts them per reason (in the iterator state) and enforces the
  threshold."""

  STATE_KEY = "xblip_bad_records"

  def __init__(self, parent: grain.IterDataset, name: str, max_fraction: float,
               min_checked: int):
    super().__init__(parent)
    self.name, self.max_fraction, self.min_checked = name, max_fraction, min_checked

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipBadIterator(self._parent.__iter__(), self)


class _SkipBadIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, ds: SkipBadIterDataset):
    super().__init__(parent)
    self._ds = ds
    self._seen = 0
    self._bad: collections.Counter[str] = collections.Counter()
    self._logged: set[str] = set()

  def _check(self, final: bool) -> None:
    bad = sum(self._bad.values())
    if not bad or (self._seen < self._ds.min_checked and not final):
      return
    if bad / self._seen > self._ds.max_fraction:
      raise TooManyBadRecordsError(
          f"dataset {self._ds.name!r}: {bad} of {self._seen} records unusable "
          f"(> {self._ds.max_fraction:.1%}): {dict(self._bad)}; "
          f"e.g. {sorted(self._logged)[:5]}")

  def __next__(self):
    while True:
      try:
        value = next(self._parent)
      except StopIteration:
        self._check(final=True)
        raise
      self._seen += 1
      if isinstance(value, BadRecord):
        self._bad[value.reason] += 1
        if value.path not in self._logged:
          self._logged.add(value.path)
          log.warning("dataset %r: skipping %s", self._ds.name, value.message)
        self._check(final=False)
        continue
      self._check(final=False)
      return value

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(),
            SkipBadIterDataset.STATE_KEY: {"name": self._ds.name, "seen": self._seen,
                                           "bad": dict(self._bad)}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    info = state[SkipBadIterDataset.STATE_KEY]
    self._seen, self._bad = int(info["seen"]), collections.Counter(info["bad"])


class RandomMixIterDataset(grain.IterDataset):
  """Draws the source of element k with probability `weights[i]` from an rng keyed by
  (seed, k): stateless draws, so the state is the parents' states plus k. Stops when the
  drawn parent is exhausted."""

  def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float], seed: int):
    super().__init__(list(parents))
    w = np.asarray(weights, np.float64)
    if w.shape != (len(parents),) or (w <= 0).any() or not np.isfinite(w).all():
      raise ValueError(f"need one positive weight per dataset, got {list(weights)}")
    self.cdf, self.seed = np.cumsum(w / w.sum()), seed

  def __iter__(self) -> grain.DatasetIterator:
    return _RandomMixIterator([p.__iter__() for p in self._parents], self)


class _RandomMixIterator(grain.DatasetIterator):

  def __init__(self, parents: Sequence[grain.DatasetIterator], ds: RandomMixIterDataset):
    super().__init__(parents)
    self._ds, self._index = ds, 0

  def __next__(self):
    u = np.random.default_rng([self._ds.seed, self._index]).uniform()
    source = min(int(np.searchsorted(self._ds.cdf, u, side="right")), len(self._parents) - 1)
    value = next(self._parents[source])
    self._index += 1
    return value

  def get_state(self) -> dict[str, Any]:
    return {"parents": [p.get_state() for p in self._parents], "index": self._index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for parent, parent_state in zip(self._parents, state["parents"], strict=True):
      parent.set_state(parent_state)
    self._index = int(state["index"])


def sqrt_weights(sizes: Sequence[int]) -> list[float]:
  """Normalised sqrt(size) weights: the reference's dataset ratios."""
  roots = [math.sqrt(s) for s in sizes]
  total = sum(roots)
  return [r / total for r in roots]


def load_media(example: Example, rng: np.random.Generator, *, train: bool,
               opts: MediaOptions = MediaOptions()) -> dict[str, np.ndarray]:
  """Decoded, preprocessed media of one example, keyed by modality name.

  Keys: `image` (S,S,3) | `video` (T,S,S,3) | `audio` (C,L,128) with `audio_clip_mask` (C,) and
  `audio_padding_mask` (C,L) | `pc` (N,3); float32 except the boolean masks.
  """
  out: dict[str, np.ndarray] = {}
  for modality, path in zip(example.modalities, example.media_paths, strict=True):
    if modality in out:
      raise RecordError(f"modality {modality!r} appears twice", example.id)
    if modality == "image":
      from xblip_jax.data.preprocess.image import preprocess_image
      out["image"] = preprocess_image(path, train=train, rng=rng, size=opts.image_size)
    elif modality == "video":
      from xblip_jax.data.preprocess.video import preprocess_video
      out["video"] = preprocess_video(
          path, train=train, rng=rng, n_frms=opts.n_frms, size=opts.image_size,
          hflip_prob=opts.video_hflip_prob, reference_quirks=opts.video_reference_quirks)
    elif modality == "audio":
      from xblip_jax.data.preprocess.audio_io import preprocess_audio
      clips, clip_mask, padding = preprocess_audio(
          path, num_clips=opts.num_clips, frames_per_clip=opts.frames_per_clip)
      out.update(audio=clips, audio_clip_mask=clip_mask, audio_padding_mask=padding)
    else:
      from xblip_jax.data.preprocess.pointcloud import preprocess_pc
      out["pc"] = preprocess_pc(path, rng=rng, npoints=opts.npoints)
  return out


class _Element:
  """The per-element map: text templates, media, text encoding; bad records become markers."""

  def __init__(self, spec: DatasetSpec, spec_index: int, encode_text: EncodeText,
               cfg: PipelineConfig, process_index: int):
    self.spec, self.encode_text, self.cfg = spec, encode_text, cfg
    self.key = (cfg.seed, spec_index, process_index)
    self.captions = None
    if spec.binary_qa:
      self.captions = sorted({str(e.meta["caption"]) for e in spec.examples
                              if e.meta.get("caption")})

  def __call__(self, index: int, example: Example) -> dict[str, np.ndarray] | BadRecord:
    rng = np.random.default_rng([*self.key, index])
    try:
      if self.spec.instruct:
        example = templates.instruct(example, rng, prompt=self.spec.prompt,
                                     binary_captions=self.captions)
      with staged_media(example) as local:  # shard records: their bytes as local files
        out = load_media(local, rng, train=self.cfg.train, opts=self.spec.media)
      text = self.encode_text(example)
    except MediaError as e:
      return BadRecord(e.reason.split(" (")[0], e.path, str(e))
    except RecordError as e:
      return BadRecord(e.reason, example.media_paths[0], f"{example.id}: {e.reason}")
    clash = set(out) & set(text)
    if clash:
      raise ValueError(f"encode_text returned media keys {sorted(clash)}")
    out.update({k: np.asarray(v) for k, v in text.items()})
    return out


def _host(cfg: PipelineConfig) -> tuple[int, int]:
  if cfg.process_index is not None and cfg.process_count is not None:
    return cfg.process_index, cfg.process_count
  import jax
  return jax.process_index(), jax.process_count()


def dataset_pipeline(spec: DatasetSpec, encode_text: EncodeText, cfg: PipelineConfig,
                     spec_index: int = 0) -> grain.IterDataset:
  """Batches of one dataset (see the module docstring for the stages)."""
  if not spec.examples:
    raise ValueError(f"dataset {spec.name!r} has no examples")
  index, count = _host(cfg)
  ds = spec.examples  # a MapDataset (prepared shards) is read lazily, by index
  if not isinstance(ds, grain.MapDataset):
    ds = grain.MapDataset.source(list(ds))
  if cfg.shuffle:
    ds = ds.shuffle(seed=(cfg.seed * 1_000_003 + spec_index) % 2**32)
  ds = ds.repeat(cfg.num_epochs)
  if count > 1:
    ds = ds[index::count]
  ds = ds.map_with_index(_Element(spec, spec_index, encode_text, cfg, index))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                            prefetch_buffer_size=cfg.prefetch_buffer_size))
  it = SkipBadIterDataset(it, spec.name, cfg.max_bad_fraction, cfg.min_records_checked)
  return it.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)


def build_pipeline(specs: Sequence[DatasetSpec], encode_text: EncodeText,
                   cfg: PipelineConfig) -> grain.IterDataset:
  """The mixed, batched pipeline; `iter()` of it is the checkpointable iterator.

  Each batch is a dict of numpy arrays: the media keys of `load_media` with a leading batch
  axis, plus what `encode_text` returns (stacked). One dataset per batch.
  """
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"dataset names must be unique: {names}")
  parts = [dataset_pipeline(s, encode_text, cfg, i) for i, s in enumerate(specs)]
  if len(parts) == 1:
    ds = parts[0]
  else:
    default = sqrt_weights([len(s.examples) for s in specs])
    weights = [s.weight if s.weight is not None else w for s, w in zip(specs, default, strict=True)]
    ds = RandomMixIterDataset(parts, weights, seed=cfg.seed)
  if cfg.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return ds


def bad_record_counts(state: Any) -> dict[str, dict[str, int]]:
  """Per dataset: records seen and unusable records per reason, summed over workers, read
  from an iterator state (`iter(ds).get_state()`)."""
  totals: dict[str, dict[str, int]] = {}

  def visit(node):
    if isinstance(node, Mapping):
      if SkipBadIterDataset.STATE_KEY in node:
        info = node[SkipBadIterDataset.STATE_KEY]
        entry = totals.setdefault(info["name"], {"seen": 0})
        entry["seen"] += info["seen"]
        for reason, n in info["bad"].items():
          entry[reason] = entry.get(reason, 0) + n
      for value in node.values():
        visit(value)
    elif isinstance(node, (list, tuple)):
      for value in node:
        visit(value)

  visit(state)
  return totals
