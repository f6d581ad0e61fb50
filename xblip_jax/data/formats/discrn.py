"""DisCRn (discriminatory cross-modal reasoning): "which of the two inputs ...?" questions.

Annotation: a JSON list of records with `sample_ids` [A, B], `question`, `label` (0: A answers
the question, 1: B), `properties` [2], `captions` [2], optional `captions_pred_{modality}` [2]
(single-modality model captions, for the caption baseline) and, for AudioCaps, `start_seconds`
[2]. Entity A is shown in the first modality, entity B in the second:
- `objaverse` (image-3D): A as the Cap3D render
  `{image_root}/compressed_imgs_view{v}/Cap3D_imgs_view{v}/{uid}_{v}.jpeg` (view 2), B as the
  point cloud `{pc_root}/{uid}/{uid}_8192.npz`;
- `audiocaps` (video-audio): A as `{video_root}/{id}_{int(start)}.mp4`, B as
  `{audio_root}/{id}_{int(start)}.flac`.

Label balancing (`balance_labels`, on in the reference): records at even positions with label
0 and at odd positions with label 1 are swapped so that labels alternate 1, 0, 1, 0. The
reference swaps captions and properties but NOT the media ids, so the media-based ground truth
of every swapped record is inverted; here the media ids are swapped too (`swap_media=True`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, read_records
from xblip_jax.data.formats.audiocaps import audio_filename
from xblip_jax.data.formats.objaverse import PC_PATTERN, pc_path
from xblip_jax.data.templates import discrn_question

SOURCES = {"objaverse": ("image", "pc"), "audiocaps": ("video", "audio")}
CLASSNAMES = ("first", "second")
FIRST_ANSWERS = (
    "the first option.", "the first", "left one", "(a) left", "(a) left one", "(a)", "a.", "A.",
    "a)", "(A)", "Input A", "Entity 1", "Object 1", "Entity A", "Object A", "left", "first",
    "1st", "input 1", "1", "a", "input a", "the first", "the left one")
SECOND_ANSWERS = (
    "the second option.", "the second.", "second option", "the second option", "second option.",
    "right one", "(b) right", "(b) right one", "(b)", "b)", "Input B", "right", "second", "2nd",
    "input 2", "2", "b", "input b", "Object 2", "Entity B", "Object B", "the second",
    "the right one", "the second one")
MODALITY_SYNONYMS = {"pc": ("3d", "3d model", "model", "rendering", "a 3d", "a 3d model"),
                     "image": ("photo", "picture"), "audio": ("sound",)}


def accepted_answers(label: int, modalities: tuple[str, str]) -> tuple[str, ...]:
  """The answers the DisCRn scorer accepts for `label`: position words and the modality name."""
  if label not in (0, 1) or len(modalities) != 2:
    raise ValueError(f"DisCRn compares two entities; got modalities {modalities}, label {label}")
  modality = modalities[label]
  base = FIRST_ANSWERS if label == 0 else SECOND_ANSWERS
  return (modality, *base, *MODALITY_SYNONYMS.get(modality, ()))


def _paths(ids, starts, source, roots, view):
  if source == "objaverse":
    image = os.path.join(roots["image"], f"compressed_imgs_view{view}",
                         f"Cap3D_imgs_view{view}", f"{ids[0]}_{view}.jpeg")
    return image, pc_path(roots["pc"], ids[1], roots.get("pc_pattern", PC_PATTERN))
  return (os.path.join(roots["video"], audio_filename(ids[0], starts[0], ".mp4")),
          os.path.join(roots["audio"], audio_filename(ids[1], starts[1], ".flac")))


def _pair(rec, name, required=True):
  value = field(rec, name) if required else rec.get(name)
  if value is None and not required:
    return None
  if not isinstance(value, (list, tuple)) or len(value) != 2:
    raise RecordError(f"bad field '{name}'")
  return tuple(value)


def _flip(pair):
  return None if pair is None else pair[::-1]


def read_discrn(json_path: str | os.PathLike, source: str, roots: Mapping[str, str], *,
                dataset: str | None = None, view: int = 2, balance_labels: bool = True,
                swap_media: bool = True, require_media: bool = False) -> Examples:
  """DisCRn examples with two media each.

  Args:
    json_path: annotation JSON.
    source: "objaverse" (image, pc) or "audiocaps" (video, audio).
    roots: media folder per modality ("image"/"pc" or "video"/"audio"; optional
      "pc_pattern").
    dataset: name recorded in each example (default `{source}_discrn`).
    view: Cap3D render index used for the image (the reference uses 2).
    balance_labels: alternate labels 1, 0, 1, 0 by swapping the two entities.
    swap_media: when balancing swaps entities, swap their media too (a fix; False reproduces
      the reference, whose swapped records then point at the wrong answer).
    require_media: skip records unless both entities exist in both modalities (the
      reference's filter), before balancing.

  Returns:
    Examples with task "discrn": `text_input` = rewritten question, `text_output` = "first" /
    "second", `label` 0/1, `answers` = accepted answers, `meta` = per-entity pairs
    (`sample_ids`, `start_seconds`, `properties`, `captions`, `baseline_captions`).
  """
  if source not in SOURCES:
    raise ValueError(f"unknown DisCRn source {source!r} (expected one of {tuple(SOURCES)})")
  modalities = SOURCES[source]
  dataset = dataset or f"{source}_discrn"

  def to_example(i, rec):
    ids = tuple(str(x) for x in _pair(rec, "sample_ids"))
    starts = _pair(rec, "start_seconds") if source == "audiocaps" else None
    label = field(rec, "label")
    if label not in (0, 1):
      raise RecordError("bad field 'label'")
    if require_media:
      both = (_paths(ids, starts, source, roots, view)
              + _paths(ids[::-1], _flip(starts), source, roots, view))
      if not all(os.path.exists(p) for p in both):
        raise RecordError("missing media file")
    meta = {"sample_ids": ids, "start_seconds": starts,
            "properties": _pair(rec, "properties", required=False),
            "captions": _pair(rec, "captions", required=False),
            "captions_pred": {m: _pair(rec, f"captions_pred_{m}", required=False)
                              for m in modalities}}
    return _example(str(rec.get("instance_id", i)), label, ids, starts, meta,
                    discrn_question(str(field(rec, "question"))))

  def _example(id_, label, media_ids, starts, meta, question):
    pred = meta["captions_pred"]
    baseline = tuple(None if pred[m] is None else pred[m][k] for k, m in enumerate(modalities))
    return Example(
        id=id_, modality=modalities, media=_paths(media_ids, starts, source, roots, view),
        task="discrn", text_input=question, text_output=CLASSNAMES[label], label=label,
        answers=accepted_answers(label, modalities), dataset=dataset,
        meta={**meta, "baseline_captions": baseline})

  examples = build(read_records(json_path), to_example, dataset=dataset)
  if not balance_labels:
    return examples
  out = Examples(skipped=examples.skipped)
  for k, ex in enumerate(examples):
    if (k % 2 == 1) != (ex.label == 1):
      out.append(ex)
      continue
    meta = dict(ex.meta)
    for name in ("properties", "captions"):
      meta[name] = _flip(meta[name])
    meta["captions_pred"] = {m: _flip(v) for m, v in meta["captions_pred"].items()}
    ids, starts = meta["sample_ids"], meta["start_seconds"]
    if swap_media:
      ids, starts = ids[::-1], _flip(starts)
      meta["sample_ids"], meta["start_seconds"] = ids, starts
    out.append(_example(ex.id, 1 - ex.label, ids, starts, meta, ex.text_input))
  return out
