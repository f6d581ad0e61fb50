"""Writes ArrayRecord shards of one dataset from its raw files (TFDS, no TensorFlow).

  python -m xblip_jax.data.tfds.prepare --family image --format coco_vqa \
      --input train=vqa_train.json --input val=vqa_val.json --media-root /data/coco \
      --output /data/prepared [--name coco_vqa]

`--format` names the reader (`coco_caption`, `coco_vqa`, `video_caption`, `video_qa`,
`audiocaps`, `audiocaps_qa`, `clotho`, `cap3d_caption`, `cap3d_qa`, `discrn_objaverse`,
`discrn_audiocaps`); DisCRn takes one root per modality (`--media-root image=... --media-root
pc=...`). Prints the dataset directory and the counts of records left out, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from xblip_jax.data.demo import DemoDataset, read_demo
from xblip_jax.data.pipeline import MediaOptions
from xblip_jax.data.tfds import builders, source


def _pairs(values: Sequence[str], default_key: str) -> dict[str, str]:
  out = {}
  for value in values:
    key, sep, rest = value.partition("=")
    out.update({key: rest} if sep else {default_key: value})
  return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--family", required=True, choices=sorted(builders.BUILDERS))
  p.add_argument("--format", required=True, help="reader name (see the module docstring)")
  p.add_argument("--input", action="append", required=True,
                 help="annotation file, or SPLIT=FILE (repeat for several splits)")
  p.add_argument("--media-root", action="append", required=True,
                 help="media folder, or MODALITY=FOLDER for DisCRn")
  p.add_argument("--output", required=True, help="TFDS data_dir")
  p.add_argument("--name", help="dataset (config) name; default: --format")
  p.add_argument("--max-bad-fraction", type=float, default=0.05)
  p.add_argument("--no-decode-check", action="store_true",
                 help="only check that media files can be read, do not decode them")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  tfds.disable_progress_bar()
  name = args.name or args.format
  roots = _pairs(args.media_root, "")
  root = roots[""] if set(roots) == {""} else roots
  splits = {split: read_demo(DemoDataset(name, split, args.format, path, root))
            for split, path in _pairs(args.input, "train").items()}
  directory = builders.prepare(args.family, name, splits, args.output, media=MediaOptions(),
                               check_media=not args.no_decode_check,
                               max_bad_fraction=args.max_bad_fraction)
  result = {"directory": directory, "counts": source.preparation_counts(directory)}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
