"""Dataset names of the experiment configs -> how to read them from disk.

A config names datasets the way the reference's yamls do (`coco_caption_instruct`,
`audiocaps_mm_qa`, ...). Each name maps to a reader family, a modality and task, and a default
location of its annotation files and media below `data.root`, laid out as LAVIS' `cache_root`
(`coco/annotations/coco_karpathy_train.json`, `coco/images`, ...; see docs/launch.md,
"Preparing the datasets"). `data.paths.<name>.annotation` / `.media` move one dataset
elsewhere (relative to `data.root`, or absolute; several annotation files separated by
commas), `.shards` names its prepared ArrayRecord dataset (`data/tfds/prepare.py`) to train
from instead of the raw files, and `.require_media` (Python configs) switches the up-front
existence check of media files. The defaults for that check follow the reference: datasets
whose LAVIS class filters records to files on disk check here too; the others meet a missing
file in the pipeline, where it is skipped and counted against `data.max_bad_fraction`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xblip_jax.config_utils import ConfigError
from xblip_jax.data.example import Examples
from xblip_jax.data.formats import (audiocaps, audioset, clotho, coco, discrn, esc50, llava,
                                    modelnet40, msrvtt, objaverse, ocrvqa, wavcaps, webvid)

# AudioCaps clips the reference leaves out (`missing_ids` of its audio yamls).
AUDIOCAPS_MISSING = ("2sh7ZkazyO8", "966jA2-z0mQ", "52RlolYyjAE", "HVAc9hm4jjk", "8lPjqvYWNyM",
                     "eXgPnnE3TuQ")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One named dataset split.

  Attributes:
    family: reader key in `READERS`.
    modality: "image" | "video" | "audio" | "pc", or a pair (DisCRn).
    task: "caption" | "qa" | "classification" | "discrn".
    annotations: annotation files, relative to `data.root`.
    media: media folder relative to `data.root`, or one per modality (DisCRn).
    split: "train", "val" or "test".
    require_media: skip records whose media file is absent when reading (counted).
    spec: `pipeline.DatasetSpec` overrides (`binary_qa`, `instruct`).
    options: `pipeline.MediaOptions` overrides.
    kwargs: extra reader arguments.
    eval_task: the `eval/tasks.py` task that scores it as an evaluation set.
  """

  family: str
  modality: str | tuple[str, ...]
  task: str
  annotations: tuple[str, ...]
  media: str | Mapping[str, str]
  split: str = "train"
  require_media: bool = False
  spec: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_task: str | None = None

  @property
  def modalities(self) -> tuple[str, ...]:
    return (self.modality,) if isinstance(self.modality, str) else tuple(self.modality)


def _each(reader: Callable[..., Examples]) -> Callable[..., Examples]:
  """A reader of several annotation files with one media root: examples concatenated."""
  def read(annotations, media, **kwargs):
    out = Examples()
    for path in annotations:
      part = reader(path, media, **kwargs)
      out.extend(part)
      out.skipped.update(part.skipped)
    return out
  return read


def _audioset(annotations, media, **kwargs):
  if len(annotations) != 2:
    raise ConfigError("audioset needs two annotation files: the segment CSV and "
                      f"class_labels_indices.csv, got {list(annotations)}")
  return audioset.read_audioset(annotations[0], annotations[1], media, **kwargs)


def _modelnet40(annotations, media, **kwargs):
  """Annotations: the shape-names file, the `.dat` pickle, optionally the shape-id list (the
  reference's order); the media folder is unused (the points are inside the `.dat`)."""
  del media
  if len(annotations) not in (2, 3):
    raise ConfigError("modelnet40 needs modelnet40_shape_names.txt, the *_8192pts_fps.dat "
                      f"file and optionally the shape-id list, got {list(annotations)}")
  return modelnet40.read_modelnet40(annotations[1], annotations[0],
                                    shape_ids_path=annotations[2] if len(annotations) == 3
                                    else None, **kwargs)


def _discrn(source):
  def read(annotations, media, **kwargs):
    return _each(lambda path, roots, **kw: discrn.read_discrn(path, source, roots, **kw))(
        annotations, media, **kwargs)
  return read


READERS: dict[str, Callable[..., Examples]] = {
    "caption_json": _each(coco.read_coco_caption), "vqa_json": _each(coco.read_coco_vqa),
    "ocr_vqa": _each(ocrvqa.read_ocr_vqa), "llava": _each(llava.read_llava_dialogue),
    "video_caption": _each(msrvtt.read_video_caption), "video_qa": _each(msrvtt.read_video_qa),
    "webvid": _each(webvid.read_webvid), "audiocaps": _each(audiocaps.read_audiocaps),
    "audiocaps_qa": _each(audiocaps.read_audiocaps_qa), "wavcaps": _each(wavcaps.read_wavcaps),
    "audioset": _audioset, "clotho": _each(clotho.read_clotho),
    "cap3d_caption": _each(objaverse.read_cap3d_caption),
    "cap3d_qa": _each(objaverse.read_cap3d_qa),
    "discrn_objaverse": _discrn("objaverse"), "discrn_audiocaps": _discrn("audiocaps"),
    "esc50": _each(esc50.read_esc50), "modelnet40": _modelnet40,
}


def _image(family, task, ann, media="coco/images", **kw):
  return Entry(family, "image", task, tuple(ann), media, **kw)


_LLAVA = _image("llava", "qa", ["LLaVA-Instruct-150K/annotations/lava_instruct_150k.json"],
                "coco/images/train2017", spec={"instruct": False})
_AUDIOCAPS = dict(kwargs={"exclude_ids": AUDIOCAPS_MISSING}, require_media=True)
_MODELNET40 = tuple(f"modelnet40_normal_resampled/{f}" for f in (
    modelnet40.SHAPE_NAMES, "modelnet40_test_8192pts_fps.dat", "modelnet40_test.txt"))

ENTRIES: dict[str, Entry] = {
    # --- image (reference section 2.3) ---
    "conceptual_caption_12m_instruct": _image(
        "caption_json", "caption", ["conceptual_caption/annotations/cc12m.json"],
        "conceptual_caption/images_12m"),
    "coco_caption_instruct": _image("caption_json", "caption",
                                    ["coco/annotations/coco_karpathy_train.json"],
                                    eval_task="coco_caption"),
    "capfilt14m_instruct": _image("caption_json", "caption",
                                  ["capfilt14m/annotations/annotation.json"], "capfilt14m/images"),
    "vg_caption_instruct": _image("caption_json", "caption", ["vg/annotations/vg_caption.json"],
                                  "vg/images"),
    "sbu_caption_instruct": _image("caption_json", "caption", ["sbu_captions/annotations/sbu.json"],
                                   "sbu_captions/images"),
    "vg_vqa_instruct": _image("vqa_json", "qa", ["vg/annotations/vg_qa.json"], "vg/images"),
    "coco_vqa_instruct": _image("vqa_json", "qa", ["coco/annotations/vqa_train.json",
                                                   "coco/annotations/vqa_val.json"],
                                eval_task="vqav2"),
    "ocr_vqa_instruct": _image("ocr_vqa", "qa", ["ocrvqa/annotations/ocrvqa.json"],
                               "ocrvqa/images", require_media=True),
    "ok_vqa_instruct": _image("vqa_json", "qa", ["okvqa/annotations/okvqa_train.json"],
                              eval_task="okvqa"),
    "aok_vqa_instruct": _image("vqa_json", "qa", ["aokvqa/annotations/aokvqa_v1p0_train.json"]),
    "llava150k_dialogue_instruct": _LLAVA,
    "llava150k": _LLAVA,  # the 13B yaml's key (not a registered builder in LAVIS)
    # --- audio ---
    "audiocaps_mm_caption_instruct": Entry(
        "audiocaps", "audio", "caption", ("audiocaps/annotations/train.csv",),
        "audiocaps/audio/train", eval_task="audiocaps", **_AUDIOCAPS),
    "audiocaps_mm_qa": Entry(
        "audiocaps_qa", "audio", "qa", ("audiocaps_qa/annotations/train.csv",),
        "audiocaps/audio/train", spec={"binary_qa": True}, eval_task="audiocaps_qa",
        **_AUDIOCAPS),
    "wavcaps_mm_caption_instruct": Entry(
        "wavcaps", "audio", "caption",
        tuple(f"wavcaps/json_files/{f}" for f in (
            "BBC_Sound_Effects/bbc_final.json", "FreeSound/fsd_final.json",
            "SoundBible/sb_final.json", "AudioSet_SL/as_final.json")), "wavcaps/audio"),
    "audioset_mm_caption_instruct": Entry(
        "audioset", "audio", "classification",
        ("audioset/annotations/balanced_train_clean.csv",
         "audioset/annotations/class_labels_indices.csv"), "audioset/audio",
        require_media=True),
    # --- 3D ---
    "objaverse_mm_caption_instruct": Entry(
        "cap3d_caption", "pc", "caption", ("objaverse/annotations/train.csv",), "objaverse/pc",
        require_media=True, eval_task="cap3d"),
    "objaverse_mm_qa": Entry(
        "cap3d_qa", "pc", "qa", ("objaverse_qa/annotations/train.csv",), "objaverse/pc",
        require_media=True, spec={"binary_qa": True}, kwargs={"remove_model_answer": True},
        eval_task="objaverse_qa"),
    # --- video ---
    "msrvtt_caption_instruct": Entry("video_caption", "video", "caption",
                                     ("msrvtt/annotations/cap_train.json",), "msrvtt/videos",
                                     eval_task="msrvtt_caption"),
    "msrvtt_qa_instruct": Entry("video_qa", "video", "qa", ("msrvtt/annotations/qa_train.json",),
                                "msrvtt/videos", eval_task="msrvtt_qa"),
    "webvid2m_caption_instruct": Entry("webvid", "video", "caption",
                                       ("webvid2m/annotations/train.json",), "webvid2m/videos"),
    # --- evaluation splits ---
    "coco_caption_val": _image("caption_json", "caption",
                               ["coco/annotations/coco_karpathy_val.json"], split="val",
                               eval_task="coco_caption"),
    "coco_caption_test": _image("caption_json", "caption",
                                ["coco/annotations/coco_karpathy_test.json"], split="test",
                                eval_task="coco_caption"),
    "msrvtt_caption_test": Entry("video_caption", "video", "caption",
                                 ("msrvtt/annotations/cap_test.json",), "msrvtt/videos",
                                 split="test", eval_task="msrvtt_caption"),
    "msrvtt_qa_test": Entry("video_qa", "video", "qa", ("msrvtt/annotations/qa_test.json",),
                            "msrvtt/videos", split="test", eval_task="msrvtt_qa"),
    "msvd_qa_test": Entry("video_qa", "video", "qa", ("msvd/annotations/qa_test.json",),
                          "msvd/videos", split="test", eval_task="msvd_qa"),
    "audiocaps_caption_test": Entry(
        "audiocaps", "audio", "caption", ("audiocaps/annotations/test.csv",),
        "audiocaps/audio/test", split="test", require_media=True,
        kwargs={"one_per_clip": True}, eval_task="audiocaps"),
    "clotho_caption_eval": Entry(
        "clotho", "audio", "caption", ("clotho/annotations/clotho_captions_evaluation.csv",),
        "clotho/audio/evaluation", split="test", eval_task="clotho"),
    "objaverse_caption_val": Entry(
        "cap3d_caption", "pc", "caption", ("objaverse/annotations/val.csv",), "objaverse/pc",
        split="val", require_media=True, eval_task="cap3d"),
    "discrn_image_pc": Entry(
        "discrn_objaverse", ("image", "pc"), "discrn", ("discrn/annotations/objaverse.json",),
        {"image": "objaverse/images", "pc": "objaverse/pc"}, split="val",
        eval_task="discrn_image_3d"),
    "discrn_audio_video": Entry(
        "discrn_audiocaps", ("video", "audio"), "discrn", ("discrn/annotations/audiocaps.json",),
        {"video": "audiocaps/video/val", "audio": "audiocaps/audio/val"}, split="val",
        options={"n_frms": 2}, eval_task="discrn_audio_video"),
    # Classification (eval yamls `esc50_classification*`, `modelnet40_*`): one split each,
    # scored by likelihood ranking or by generation.
    "esc50_cls_val": Entry("esc50", "audio", "classification", ("ESC-50/esc50.csv",),
                           "ESC-50/audio", split="val", eval_task="esc50"),
    "esc50_completion_val": Entry("esc50", "audio", "classification", ("ESC-50/esc50.csv",),
                                  "ESC-50/audio", split="val", eval_task="esc50_gen"),
    "modelnet40_cls_val": Entry("modelnet40", "pc", "classification", _MODELNET40,
                                "modelnet40_normal_resampled", split="val",
                                eval_task="modelnet40"),
    "modelnet40_completion_val": Entry("modelnet40", "pc", "classification", _MODELNET40,
                                       "modelnet40_normal_resampled", split="val",
                                       eval_task="modelnet40_gen"),
}

OVERRIDE_KEYS = ("annotation", "media", "shards", "require_media")


@dataclasses.dataclass(frozen=True)
class Resolved:
  """An entry with its files located: what `read` needs."""

  name: str
  entry: Entry
  annotations: tuple[str, ...]
  media: str | dict[str, str]
  require_media: bool
  shards: str = ""  # prepared TFDS dataset directory; "" -> the raw files


def known_names(split: str | None = None) -> list[str]:
  return sorted(n for n, e in ENTRIES.items() if split is None or e.split == split)


def lookup(name: str, where: str) -> Entry:
  """The entry of `name`; `where` is the config field that named it (for the error)."""
  if name not in ENTRIES:
    raise ConfigError(f"{where}: unknown dataset {name!r}; known datasets: "
                      f"{', '.join(known_names())}")
  return ENTRIES[name]


def _paths(value: str | Sequence[str]) -> tuple[str, ...]:
  items = value.split(",") if isinstance(value, str) else list(value)
  return tuple(str(p).strip() for p in items if str(p).strip())


def resolve(name: str, root: str | os.PathLike, override: Mapping[str, Any] | None = None, *,
            where: str = "data.train_datasets") -> Resolved:
  """Locates one dataset's files under `root`, applying `data.paths.<name>` overrides.

  Raises:
    ConfigError: unknown name, unknown override key, or an annotation file that does not
      exist (naming the field that sets its path).
  """
  entry = lookup(name, where)
  override = dict(override or {})
  for key in override:
    if key not in OVERRIDE_KEYS:
      raise ConfigError(f"unknown config field data.paths.{name}.{key}; known fields: "
                        f"{', '.join(OVERRIDE_KEYS)}")
  join = lambda p: os.path.join(root, p)
  annotations = tuple(join(p) for p in (_paths(override["annotation"])
                                         if override.get("annotation") else entry.annotations))
  media_value = override.get("media") or entry.media
  media = (join(media_value) if isinstance(media_value, str)
           else {m: join(p) for m, p in dict(media_value).items()})
  shards = join(override["shards"]) if override.get("shards") else ""
  if shards and not Path(shards).is_dir():
    raise ConfigError(f"data.paths.{name}.shards={shards}: not a prepared dataset directory")
  for path in () if shards else annotations:
    if not Path(path).is_file():
      raise ConfigError(f"dataset {name!r}: annotation file {path} not found (set data.root, or "
                        f"data.paths.{name}.annotation; see docs/launch.md)")
  require = override.get("require_media", "")
  return Resolved(name, entry, annotations, media,
                  entry.require_media if require in ("", None) else bool(require), shards)


def read(resolved: Resolved) -> Examples:
  """The examples of one located dataset (records without usable fields skipped, counted)."""
  e = resolved.entry
  return READERS[e.family](resolved.annotations, resolved.media, dataset=resolved.name,
                           require_media=resolved.require_media, **dict(e.kwargs))
