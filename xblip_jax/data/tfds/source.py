"""Grain sources over prepared shards: a `MapDataset` of `Example`s and a `DatasetSpec`.

`build_pipeline` takes a `MapDataset` as `DatasetSpec.examples` as it is (no copy into a
list), shuffles it by index and reads a record only when its element is produced; media bytes
are staged to local files around `load_media` (`staging`). The data source is TFDS'
`as_data_source()` over the ArrayRecord files: no TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import tensorflow_datasets as tfds

from xblip_jax.data.pipeline import DatasetSpec
from xblip_jax.data.tfds import records


def shard_examples(directory: str | os.PathLike, split: str = "train") -> grain.MapDataset:
  """`ShardExample`s of one split of a prepared dataset, in the reader's order."""
  builder = tfds.builder_from_directory(os.fspath(directory))
  return grain.MapDataset.source(builder.as_data_source(split)).map(records.from_record)


def preparation_counts(directory: str | os.PathLike) -> dict[str, Any]:
  """Per split: records kept, left out per reason, and left out by the reader."""
  return dict(tfds.builder_from_directory(os.fspath(directory)).info.metadata)


def spec_from_shards(directory: str | os.PathLike, split: str = "train", *,
                     name: str | None = None, **spec_kwargs: Any) -> DatasetSpec:
  """A `DatasetSpec` over prepared shards; `name` defaults to the dataset's config name."""
  if name is None:
    name = tfds.builder_from_directory(os.fspath(directory)).builder_config.name
  return DatasetSpec(name=name, examples=shard_examples(directory, split), **spec_kwargs)
