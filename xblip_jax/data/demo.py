"""A small synthetic instruction dataset in the reference's real on-disk formats.

`write_demo_data(root)` writes, deterministically and in a few seconds on CPU, data whose answers
can only be read from the media:
- image (COCO caption + VQA JSON, PNG 64-224 px): one coloured shape; colour and shape;
- video (MSR-VTT caption + QA JSON, MP4): a coloured square moving left / right / up / down;
- audio, AudioCaps layout (caption + QA CSV, FLAC 32 kHz `{ytid}_{start}.flac`) and Clotho
  layout (five-caption CSV, WAV 44.1 kHz): beeps of high / low pitch and fast / slow rhythm;
- 3D, Cap3D layout (caption + QA CSV, `<uid>/<uid>_8192.npz`): sphere, cube, cylinder, cone;
- DisCRn (JSON): image-3D pairs ("which ... is a cone?") in the Objaverse layout, and
  video-audio pairs ("which ... is faster?") in the AudioCaps layout.
Train and held-out ("val") splits hold different items. Answer vocabularies are small (4
colours, 3-4 shapes, 4 directions, 2 pitches, 2 speeds, first/second), so accuracy far above
chance is measurable. The media writers live in `demo_media.py`; this module lays out files,
annotations and the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xblip_jax.data import demo_classification
from xblip_jax.data import demo_media as dm
from xblip_jax.data.example import Examples
from xblip_jax.data.formats import (audiocaps, clotho, coco, discrn, esc50, modelnet40, msrvtt,
                                    objaverse)
from xblip_jax.data.pipeline import DatasetSpec, MediaOptions

SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class DemoSizes:
  """Items per split (train, val) for each family."""

  image: tuple[int, int] = (96, 32)
  video: tuple[int, int] = (64, 32)
  audiocaps: tuple[int, int] = (64, 32)
  clotho: tuple[int, int] = (8, 4)
  pc: tuple[int, int] = (64, 32)
  discrn: tuple[int, int] = (32, 32)


@dataclasses.dataclass(frozen=True)
class DemoDataset:
  """One written dataset split: which reader reads it, from where, and how to preprocess it."""

  name: str
  split: str
  reader: str
  annotation: str
  media_root: str | dict[str, str]
  options: dict[str, Any] = dataclasses.field(default_factory=dict)  # MediaOptions overrides
  spec: dict[str, Any] = dataclasses.field(default_factory=dict)     # DatasetSpec overrides


Manifest = dict[str, dict[str, DemoDataset]]  # dataset name -> split -> entry

_READERS = {
    "coco_caption": coco.read_coco_caption, "coco_vqa": coco.read_coco_vqa,
    "video_caption": msrvtt.read_video_caption, "video_qa": msrvtt.read_video_qa,
    "audiocaps": audiocaps.read_audiocaps, "audiocaps_qa": audiocaps.read_audiocaps_qa,
    "clotho": clotho.read_clotho, "cap3d_caption": objaverse.read_cap3d_caption,
    "cap3d_qa": objaverse.read_cap3d_qa,
    "esc50": esc50.read_esc50,  # demo_classification.py
    "modelnet40": modelnet40.read_modelnet40,  # media_root: the shape-names file
}


def read_demo(entry: DemoDataset) -> Examples:
  """Reads one manifest entry back with the real reader of its format."""
  if entry.reader.startswith("discrn_"):
    return discrn.read_discrn(entry.annotation, entry.reader[len("discrn_"):], entry.media_root,
                              dataset=entry.name)
  return _READERS[entry.reader](entry.annotation, entry.media_root, dataset=entry.name)


def demo_specs(manifest: Manifest, split: str = "train", *, names: Sequence[str] | None = None,
               media: MediaOptions = MediaOptions(), instruct: bool = True) -> list[DatasetSpec]:
  """`DatasetSpec`s of the demo datasets of one split, ready for `pipeline.build_pipeline`."""
  specs = []
  for name in names if names is not None else sorted(manifest):
    entry = manifest[name][split]
    specs.append(DatasetSpec(name=name, examples=read_demo(entry),
                             media=dataclasses.replace(media, **entry.options),
                             instruct=instruct, **entry.spec))
  return specs


def load_manifest(root: str | os.PathLike) -> Manifest:
  """The manifest that `write_demo_data` saved as `root/manifest.json`."""
  raw = json.loads((Path(root) / "manifest.json").read_text())
  return {name: {split: DemoDataset(**e) for split, e in splits.items()}
          for name, splits in raw.items()}


def _write_json(path: Path, obj: Any) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1))
  return str(path)


def _write_csv(path: Path, header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
  import csv
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    if header:
      writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
  return items[int(rng.integers(len(items)))]


def _image_split(root: Path, split: str, n: int, rng: np.random.Generator, manifest: Manifest):
  images, caps, vqa = root / "image" / "images", [], []
  for k in range(n):
    colour, shape = _pick(rng, dm.COLOURS), _pick(rng, dm.SHAPES_2D)
    rel = f"{split}/{split}_{k:04d}.png"
    dm.write_shape_image(images / rel, colour, shape, rng)
    caps.append({"image": rel, "caption": _pick(rng, dm.IMAGE_CAPTIONS).format(c=colour, s=shape),
                 "image_id": f"{split}_{k}"})
    question, answer = _pick(rng, ((dm.IMAGE_QUESTIONS[0], colour),
                                   (dm.IMAGE_QUESTIONS[1], shape)))
    vqa.append({"image": rel, "question": question, "answer": [answer],
                "question_id": f"{split}_{k}"})
  if split != "train":  # evaluation files list the references
    caps = [dict(c, caption=[c["caption"]]) for c in caps]
  ann = root / "image" / "annotations"
  manifest.setdefault("image_caption", {})[split] = DemoDataset(
      "image_caption", split, "coco_caption", _write_json(ann / f"coco_caption_{split}.json", caps),
      str(images))
  manifest.setdefault("image_qa", {})[split] = DemoDataset(
      "image_qa", split, "coco_vqa", _write_json(ann / f"coco_vqa_{split}.json", vqa), str(images))


def _video_split(root: Path, split: str, n: int, rng: np.random.Generator, manifest: Manifest):
  videos, caps, qa = root / "video" / "videos", [], []
  for k in range(n):
    colour, direction = _pick(rng, dm.COLOURS), _pick(rng, dm.DIRECTIONS)
    name = f"{split}{k:04d}.mp4"
    dm.write_moving_square(videos / name, colour, direction, speed=3, rng=rng)
    caps.append({"video": name, "caption": _pick(rng, dm.VIDEO_CAPTIONS).format(
        c=colour, d=direction), "image_id": f"{split}{k}"})
    question, answer = _pick(rng, ((dm.VIDEO_QUESTIONS[0], direction),
                                   (dm.VIDEO_QUESTIONS[1], colour)))
    qa.append({"video": name, "question": question, "answer": answer,
               "question_id": f"{split}{k}"})
  ann = root / "video" / "annotations"
  no_flip = {"video_hflip_prob": 0.0}  # a flip would turn "left" into "right"
  manifest.setdefault("video_caption", {})[split] = DemoDataset(
      "video_caption", split, "video_caption", _write_json(ann / f"cap_{split}.json", caps),
      str(videos), options=no_flip)
  manifest.setdefault("video_qa", {})[split] = DemoDataset(
      "video_qa", split, "video_qa", _write_json(ann / f"qa_{split}.json", qa), str(videos),
      options=no_flip)


def _audiocaps_split(root: Path, split: str, n: int, rng: np.random.Generator,
                     manifest: Manifest):
  audio, caps, qa = root / "audiocaps" / "audio" / split, [], []
  for k in range(n):
    pitch, speed = _pick(rng, dm.PITCHES), _pick(rng, dm.SPEEDS)
    ytid, start = dm.youtube_id(rng), int(rng.integers(0, 30)) * 10
    dm.write_beeps(audio / audiocaps.audio_filename(ytid, start), pitch, speed, 32000, rng)
    caption = _pick(rng, dm.AUDIO_CAPTIONS).format(p=pitch, s=speed)
    caps.append((f"{split}{k}", ytid, start, caption))
    question, answer = _pick(rng, ((dm.AUDIO_QUESTIONS[0], pitch), (dm.AUDIO_QUESTIONS[1], speed)))
    qa.append((f"{split}{k}", ytid, start, caption, question, answer))
  ann = root / "audiocaps" / "annotations"
  header = ("audiocap_id", "youtube_id", "start_time", "caption")
  manifest.setdefault("audiocaps_caption", {})[split] = DemoDataset(
      "audiocaps_caption", split, "audiocaps", _write_csv(ann / f"{split}.csv", header, caps),
      str(audio))
  manifest.setdefault("audiocaps_qa", {})[split] = DemoDataset(
      "audiocaps_qa", split, "audiocaps_qa",
      _write_csv(ann / f"audio_qa_{split}.csv", (*header, "question", "answer"), qa), str(audio),
      spec={"binary_qa": True} if split == "train" else {})


def _clotho_split(root: Path, split: str, n: int, rng: np.random.Generator, manifest: Manifest):
  audio, rows = root / "clotho" / "audio" / split, []
  for k in range(n):
    pitch, speed = _pick(rng, dm.PITCHES), _pick(rng, dm.SPEEDS)
    name = f"beeps_{split}_{k:04d}.wav"
    dm.write_beeps(audio / name, pitch, speed, 44100, rng)
    order = rng.permutation(len(dm.AUDIO_CAPTIONS))[:5]
    rows.append((name, *(dm.AUDIO_CAPTIONS[i].format(p=pitch, s=speed) for i in order)))
  manifest.setdefault("clotho_caption", {})[split] = DemoDataset(
      "clotho_caption", split, "clotho",
      _write_csv(root / "clotho" / f"clotho_captions_{split}.csv",
                 ("file_name", *clotho.CAPTION_KEYS), rows), str(audio))


def _pc_split(root: Path, split: str, n: int, rng: np.random.Generator, manifest: Manifest):
  pcs, caps, qa = root / "objaverse" / "pc", [], []
  for _ in range(n):
    shape, uid = _pick(rng, dm.SHAPES_3D), dm.object_uid(rng)
    dm.write_point_cloud(Path(objaverse.pc_path(pcs, uid)), shape, rng)
    caption = _pick(rng, dm.PC_CAPTIONS).format(s=shape)
    caps.append((uid, caption))
    question, answer = _pick(rng, ((dm.PC_QUESTIONS[0], shape),
                                   (dm.PC_QUESTIONS[1], dm.FLAT_FACES[shape])))
    qa.append((uid, caption, question, answer))
  ann = root / "objaverse"
  manifest.setdefault("pc_caption", {})[split] = DemoDataset(
      "pc_caption", split, "cap3d_caption",
      _write_csv(ann / f"cap3d_cap_{split}.csv", ("sample_id", "caption"), caps), str(pcs))
  manifest.setdefault("pc_qa", {})[split] = DemoDataset(
      "pc_qa", split, "cap3d_qa",
      _write_csv(ann / f"cap3d_qa_{split}.csv", ("sample_id", "caption", "question", "answer"),
                 qa), str(pcs), spec={"binary_qa": True} if split == "train" else {})


def _pairs(rng: np.random.Generator, props: Sequence[str], n: int) -> list[tuple[int, int]]:
  """n pairs of item indices whose property differs."""
  out = []
  while len(out) < n:
    a, b = (int(i) for i in rng.choice(len(props), size=2, replace=False))
    if props[a] != props[b]:
      out.append((a, b))
  return out


def _discrn_split(root: Path, split: str, n: int, rng: np.random.Generator, manifest: Manifest):
  base = root / "discrn"
  # Image-3D: each object has a Cap3D-style render (view 2) and a point cloud.
  img_root, pc_root, view = base / "objaverse" / "images", base / "objaverse" / "pc", 2
  uids = [dm.object_uid(rng) for _ in range(max(4, n // 2))]
  shapes = [dm.SHAPES_3D[k % len(dm.SHAPES_3D)] for k in range(len(uids))]
  for uid, shape in zip(uids, shapes, strict=True):
    dm.write_object_render(img_root / f"compressed_imgs_view{view}" / f"Cap3D_imgs_view{view}"
                           / f"{uid}_{view}.jpeg", shape, rng)
    dm.write_point_cloud(Path(objaverse.pc_path(pc_root, uid)), shape, rng)
  records = []
  for k, (a, b) in enumerate(_pairs(rng, shapes, n)):
    label = int(rng.integers(2))
    target = shapes[(a, b)[label]]
    caps = [_pick(rng, dm.PC_CAPTIONS).format(s=shapes[i]) for i in (a, b)]
    records.append({"sample_ids": [uids[a], uids[b]], "question": f"which object is a {target}",
                    "label": label, "properties": [[shapes[a]], [shapes[b]]], "captions": caps,
                    "captions_pred_image": caps, "captions_pred_pc": caps, "instance_id": str(k)})
  manifest.setdefault("discrn_image_pc", {})[split] = DemoDataset(
      "discrn_image_pc", split, "discrn_objaverse",
      _write_json(base / f"objaverse_{split}.json", records),
      {"image": str(img_root), "pc": str(pc_root)})
  # Video-audio: each clip has a video and an audio file sharing its speed.
  vid_root, aud_root = base / "audiocaps" / "video", base / "audiocaps" / "audio"
  clips = [(dm.youtube_id(rng), int(rng.integers(0, 30)) * 10, dm.SPEEDS[k % 2])
           for k in range(max(4, n // 2))]
  for ytid, start, speed in clips:
    dm.write_moving_square(vid_root / audiocaps.audio_filename(ytid, start, ".mp4"),
                           _pick(rng, dm.COLOURS), _pick(rng, dm.DIRECTIONS),
                           speed=dm.SQUARE_SPEED[speed], rng=rng)
    dm.write_beeps(aud_root / audiocaps.audio_filename(ytid, start), _pick(rng, dm.PITCHES),
                   speed, 32000, rng)
  records = []
  for k, (a, b) in enumerate(_pairs(rng, [c[2] for c in clips], n)):
    label = int(rng.integers(2))
    word = "faster" if clips[(a, b)[label]][2] == "fast" else "slower"
    caps = [f"something {clips[i][2]}" for i in (a, b)]
    records.append({"sample_ids": [clips[a][0], clips[b][0]],
                    "start_seconds": [clips[a][1], clips[b][1]],
                    "question": f"which entity is {word}", "label": label,
                    "properties": [[clips[a][2]], [clips[b][2]]], "captions": caps,
                    "captions_pred_video": caps, "captions_pred_audio": caps,
                    "instance_id": str(k)})
  manifest.setdefault("discrn_video_audio", {})[split] = DemoDataset(
      "discrn_video_audio", split, "discrn_audiocaps",
      _write_json(base / f"audiocaps_{split}.json", records),
      {"video": str(vid_root), "audio": str(aud_root)},
      options={"n_frms": 2, "video_hflip_prob": 0.0})


def write_demo_data(root: str | os.PathLike, seed: int = 0,
                    sizes: DemoSizes = DemoSizes()) -> Manifest:
  """Writes every demo dataset under `root` (and `root/manifest.json`); returns the manifest.

  The same `seed` and `sizes` give the same files (media are drawn from one generator per
  family and split, so changing one size does not change the other families).
  """
  root = Path(root)
  manifest: Manifest = {}
  writers = (("image", _image_split), ("video", _video_split),
             ("audiocaps", _audiocaps_split), ("clotho", _clotho_split), ("pc", _pc_split),
             ("discrn", _discrn_split),
             # Appended last so that the families above keep their random draws.
             ("audiocaps", demo_classification.esc50_split),
             ("pc", demo_classification.modelnet40_split))
  for family, (fam_name, write) in enumerate(writers):
    for s, split in enumerate(SPLITS):
      rng = np.random.default_rng([seed, family, s])
      write(root, split, getattr(sizes, fam_name)[s], rng, manifest)
  _write_json(root / "manifest.json", {name: {split: dataclasses.asdict(e)
                                              for split, e in splits.items()}
                                       for name, splits in manifest.items()})
  return manifest


def demo_texts(manifest: Manifest) -> list[str]:
  """Every caption, question and answer of the demo (e.g. to train the demo tokenizer)."""
  texts: list[str] = []
  for splits in manifest.values():
    for entry in splits.values():
      for ex in read_demo(entry):
        texts.append(ex.text_input)
        outs = ex.text_output
        texts.extend([outs] if isinstance(outs, str) else outs)
        texts.extend(ex.answers)
  return sorted({t for t in texts if t})
