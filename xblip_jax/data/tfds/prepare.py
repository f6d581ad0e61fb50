"""Writes ArrayRecord shards of one dataset from its raw files (TFDS, no TensorFlow).

A dataset of the experiment configs, located as training locates it (`data/registry.py`):

  python -m xblip_jax.data.tfds.prepare --dataset coco_vqa_instruct --root /data/lavis \
      --output /data/prepared

or any annotation file of a known format (`registry.READERS`: `caption_json`, `vqa_json`,
`video_caption`, `video_qa`, `audiocaps`, `audiocaps_qa`, `clotho`, `cap3d_caption`,
`cap3d_qa`, `discrn_objaverse`, `discrn_audiocaps`, ...):

  python -m xblip_jax.data.tfds.prepare --family image --format vqa_json \
      --input train=vqa_train.json --input val=vqa_val.json --media-root /data/coco/images \
      --output /data/prepared [--name coco_vqa]

DisCRn takes one media root per modality (`--media-root image=DIR --media-root pc=DIR`).
Prints the dataset directory and the records left out per split as the last line (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from xblip_jax.data import registry
from xblip_jax.data.pipeline import MediaOptions
from xblip_jax.data.tfds import builders, source


def _pairs(values: Sequence[str], default_key: str) -> dict[str, str]:
  out = {}
  for value in values:
    key, sep, rest = value.partition("=")
    out.update({key: rest} if sep else {default_key: value})
  return out


def family_of(modality: str | Sequence[str]) -> str:
  """The builder family of a registry entry's modality (a pair is DisCRn)."""
  return modality if isinstance(modality, str) else "discrn"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--output", required=True, help="TFDS data_dir")
  p.add_argument("--dataset", help="a dataset name of data/registry.py (with --root)")
  p.add_argument("--root", help="data.root: LAVIS cache_root layout")
  p.add_argument("--family", choices=sorted(builders.BUILDERS))
  p.add_argument("--format", help="reader name of registry.READERS (with --input)")
  p.add_argument("--input", action="append", default=[],
                 help="annotation file, or SPLIT=FILE (repeat for several splits)")
  p.add_argument("--media-root", action="append", default=[],
                 help="media folder, or MODALITY=FOLDER for DisCRn")
  p.add_argument("--name", help="dataset (config) name; default: --dataset or --format")
  p.add_argument("--max-bad-fraction", type=float, default=0.05)
  p.add_argument("--no-decode-check", action="store_true",
                 help="only check that media files can be read, do not decode them")
  args = p.parse_args(argv)
  if bool(args.dataset) == bool(args.format):
    p.error("give either --dataset (with --root) or --format (with --input, --media-root)")
  if args.dataset and not args.root:
    p.error("--dataset needs --root")
  if args.format and not (args.family and args.input and args.media_root):
    p.error("--format needs --family, --input and --media-root")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  tfds.disable_progress_bar()
  media = MediaOptions()
  if args.dataset:
    located = registry.resolve(args.dataset, args.root, where="--dataset")
    family = args.family or family_of(located.entry.modality)
    media = dataclasses.replace(media, **dict(located.entry.options))
    splits = {located.entry.split: registry.read(located)}
  else:
    if args.format not in registry.READERS:
      raise SystemExit(f"unknown --format {args.format!r}; known: {sorted(registry.READERS)}")
    roots = _pairs(args.media_root, "")
    root = roots[""] if set(roots) == {""} else roots
    family = args.family
    splits = {split: registry.READERS[args.format]((path,), root, dataset=args.name or args.format)
              for split, path in _pairs(args.input, "train").items()}
  name = args.name or args.dataset or args.format
  directory = builders.prepare(family, name, splits, args.output, media=media,
                               check_media=not args.no_decode_check,
                               max_bad_fraction=args.max_bad_fraction)
  result = {"directory": directory, "counts": source.preparation_counts(directory)}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
