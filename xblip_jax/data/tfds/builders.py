"""TFDS builders, one per dataset family, writing ArrayRecord shards without TensorFlow.

A builder is given the reader's examples per split (`splits={"train": examples}`) and a
config named after the dataset (`coco_vqa`, `audiocaps_qa`, ...), and writes
`<data_dir>/xblip_<family>/<dataset>/<version>/`. Records keep the reader's order (TFDS'
shuffling is off), so a pipeline over the shards sees what it sees over the raw files.

Each example is decoded once with the eval transforms (`check_media`); one whose media the
pipeline could not use, or whose record lacks a field, is left out, logged once with its path
and counted per reason, as the pipeline counts; above `max_bad_fraction` the preparation stops.
The counts (and the reader's own skipped records) go into the dataset's `metadata.json`.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from xblip_jax.data.example import Example, MediaError, RecordError
from xblip_jax.data.pipeline import MediaOptions, TooManyBadRecordsError, load_media
from xblip_jax.data.tfds import records

log = logging.getLogger(__name__)

FEATURES = {
    "annotation": "the Example's fields as JSON (tuples tagged)",
    "media": "one blob per media path: the file's bytes as stored",
}


def bad_reason(error: MediaError | RecordError) -> str:
  """The counting key of an unusable record: the pipeline's short category."""
  return error.reason.split(" (")[0]


class ExamplesBuilder(tfds.core.GeneratorBasedBuilder):
  """Writes `Example`s with their media bytes; subclasses fix the family's modalities.

  Args:
    splits: split name -> examples (an `Examples` also carries the reader's skip counts).
    media: decoding options for the check (the eval transforms of the pipeline).
    check_media: decode each example once; False only checks that the files can be read.
    max_bad_fraction: stop when more than this fraction of a split is unusable.
    **kwargs: `tfds.core.DatasetBuilder` arguments (`data_dir`, `config`, ...).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Example JSON + media file bytes."}
  MODALITIES: tuple[tuple[str, ...], ...] = ()

  def __init__(self, *, splits: Mapping[str, Sequence[Example]] | None = None,
               media: MediaOptions = MediaOptions(), check_media: bool = True,
               max_bad_fraction: float = 0.05, **kwargs):
    self._splits = dict(splits or {})
    self._media, self._check, self._max_bad = media, check_media, max_bad_fraction
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "annotation": tfds.features.Text(doc=FEATURES["annotation"]),
            "media": tfds.features.Sequence(
                tfds.features.Tensor(shape=(), dtype=np.object_), doc=FEATURES["media"]),
        }),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # the inputs are local files named by the examples
    if not self._splits:
      raise ValueError(f"{self.name}: no examples given (splits={{'train': examples}})")
    return {name: self._generate_examples(name, examples)
            for name, examples in self._splits.items()}

  def _blobs(self, example: Example, index: int) -> tuple[bytes, ...]:
    if example.modalities not in self.MODALITIES:
      raise ValueError(f"{self.name}: example {example.id} has modalities "
                       f"{example.modalities}, expected one of {self.MODALITIES}")
    if self._check:
      load_media(example, np.random.default_rng(index), train=False, opts=self._media)
    blobs = []
    for path in example.media_paths:
      try:
        with open(path, "rb") as f:
          blobs.append(f.read())
      except FileNotFoundError:
        raise MediaError(path, "file not found") from None
      except OSError as e:
        raise MediaError(path, f"cannot read file ({e})") from None
    return tuple(blobs)

  def _generate_examples(self, split: str, examples: Sequence[Example]):
    bad: collections.Counter[str] = collections.Counter()
    kept = 0
    for index, example in enumerate(examples):
      try:
        blobs = self._blobs(example, index)
      except (MediaError, RecordError) as e:
        bad[bad_reason(e)] += 1
        path = e.path if isinstance(e, MediaError) else example.media_paths[0]
        log.warning("%s/%s: skipping %s: %s", self.builder_config.name, split, path, e)
        continue
      yield kept, records.to_record(example, blobs)
      kept += 1
    seen = kept + sum(bad.values())
    reader_skipped = dict(getattr(examples, "skipped", {}))
    self.info.metadata[split] = {"kept": kept, "bad": dict(bad), "reader_skipped": reader_skipped}
    if seen and sum(bad.values()) / seen > self._max_bad:
      raise TooManyBadRecordsError(
          f"{self.builder_config.name}/{split}: {sum(bad.values())} of {seen} records unusable "
          f"(> {self._max_bad:.1%}): {dict(bad)}")


class XblipImage(ExamplesBuilder):
  """Image captions and VQA (COCO-style JSON) with their image files."""
  MODALITIES = (("image",),)


class XblipVideo(ExamplesBuilder):
  """Video captions and QA (MSR-VTT / MSVD-style JSON) with their video files."""
  MODALITIES = (("video",),)


class XblipAudio(ExamplesBuilder):
  """Audio captions and QA (AudioCaps / Clotho CSV) with their FLAC / WAV files."""
  MODALITIES = (("audio",),)


class XblipPc(ExamplesBuilder):
  """3D captions and QA (Cap3D CSV) with their `.npz` / `.npy` / `.ply` point clouds."""
  MODALITIES = (("pc",),)


class XblipDiscrn(ExamplesBuilder):
  """DisCRn pairs with both media files (entity 0 in modality 0, entity 1 in modality 1)."""
  MODALITIES = (("image", "pc"), ("pc", "image"), ("video", "audio"), ("audio", "video"))


BUILDERS: dict[str, type[ExamplesBuilder]] = {
    "image": XblipImage, "video": XblipVideo, "audio": XblipAudio, "pc": XblipPc,
    "discrn": XblipDiscrn,
}


def prepare(family: str, name: str, splits: Mapping[str, Sequence[Example]], data_dir: str,
            **kwargs) -> str:
  """Writes the shards of one dataset; returns its directory (for `source.shard_examples`)."""
  if family not in BUILDERS:
    raise ValueError(f"unknown family {family!r} (expected one of {sorted(BUILDERS)})")
  builder = BUILDERS[family](splits=splits, data_dir=os.fspath(data_dir),
                             config=tfds.core.BuilderConfig(name=name), **kwargs)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)
