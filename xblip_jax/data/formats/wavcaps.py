"""WavCaps audio captions (FreeSound, BBC Sound Effects, SoundBible, AudioSet strongly-labelled).

Two annotation layouts are read:
- WavCaps' own per-source files (`json_files/<Source>/<x>_final.json`):
  `{"num_captions_per_audio": k, "data": [{"id", "caption" (or "caption_1".."caption_k"),
  "audio", "duration"}, ...]}`; the audio is `{audio_root}/{Source}_flac/{id stem}.flac`, the
  source named by the annotation path as the reference's `_load_json_file` does. Files with
  k > 1 captions give one example per caption (as the reference).
- the reference's merged list (`wavcaps/annotations/json_data.json`): records with `id`,
  `caption` and `audio_path` (joined to `audio_root`; an absolute path is used as is).
The reference trains on cached features of that list (`cached: True`); here the audio is
decoded like every other audio set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field

# Substring of the annotation path -> audio folder (the reference's rule).
SOURCES = (("AudioSet", "AudioSet_SL_flac"), ("BBC_Sound", "BBC_Sound_Effects_flac"),
           ("FreeSound", "FreeSound_flac"), ("SoundBible", "SoundBible_flac"))


def source_folder(ann_path: str | os.PathLike) -> str:
  """The `<Source>_flac` folder of one WavCaps annotation file."""
  for key, folder in SOURCES:
    if key in str(ann_path):
      return folder
  raise ValueError(f"{ann_path}: cannot tell the WavCaps source (expected one of "
                   f"{[k for k, _ in SOURCES]} in the path)")


def _records(ann_path):
  loaded = json.loads(Path(ann_path).read_text(encoding="utf-8"))
  if isinstance(loaded, list):  # the reference's merged list
    return loaded, None
  if not isinstance(loaded, dict) or not isinstance(loaded.get("data"), list):
    raise ValueError(f"{ann_path}: expected a WavCaps file with 'data' or a JSON list")
  k = int(loaded.get("num_captions_per_audio", 1))
  if k == 1:
    return loaded["data"], source_folder(ann_path)
  rows = [{**item, "caption": item.get(f"caption_{c}")} for item in loaded["data"]
          for c in range(1, k + 1)]
  return rows, source_folder(ann_path)


def read_wavcaps(ann_path: str | os.PathLike, audio_root: str | os.PathLike, *,
                 dataset: str = "wavcaps", require_media: bool = False) -> Examples:
  """Caption examples, one per (audio, caption)."""
  records, folder = _records(ann_path)

  def to_example(i, rec):
    audio_id = str(field(rec, "id"))
    if folder is None:
      path = os.path.join(audio_root, str(field(rec, "audio_path")))
    else:
      path = os.path.join(audio_root, folder, audio_id.rsplit(".", 1)[0] + ".flac")
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
      raise RecordError("missing field 'caption'")
    return Example(id=audio_id, modality="audio", media=path, task="caption",
                   text_output=caption, dataset=dataset)
  return build(records, to_example, dataset=dataset, require_media=require_media)
