"""AudioCaps captions and the generated AudioCaps-QA, as CSV files.

Captions (`train.csv`/`val.csv`/`test.csv`): `audiocap_id,youtube_id,start_time,caption`; QA
(`audio_qa_final_train.csv`): the same columns plus `question,answer` (and the generator's
`extractive,correct` flags, unused). Audio files are `{audio_root}/{youtube_id}_{int(start)}.flac`
(the 10-second clip cut from the YouTube video at `start_time`).
"""

from __future__ import annotations

import os
from collections.abc import Collection

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, read_records


def audio_filename(youtube_id: str, start_time: str | float, ext: str = ".flac") -> str:
  """`{youtube_id}_{int(start_time)}{ext}`, the AudioCaps clip file name."""
  try:
    start = int(float(start_time))
  except ValueError:
    raise RecordError("bad field 'start_time'") from None
  return f"{youtube_id}_{start}{ext}"


def _clip(rec, audio_root, exclude_ids):
  youtube_id = str(field(rec, "youtube_id"))
  if youtube_id in exclude_ids:
    raise RecordError("excluded id")
  start = field(rec, "start_time")
  path = os.path.join(audio_root, audio_filename(youtube_id, start))
  return youtube_id, float(start), path


def read_audiocaps(csv_path: str | os.PathLike, audio_root: str | os.PathLike, *,
                   dataset: str = "audiocaps_caption", one_per_clip: bool = False,
                   exclude_ids: Collection[str] = (), require_media: bool = False) -> Examples:
  """Caption examples, one per row (training).

  Args:
    csv_path: AudioCaps caption CSV.
    audio_root: folder holding the `.flac` clips.
    dataset: name recorded in each example.
    one_per_clip: one example per `youtube_id` whose `text_output` is the tuple of all its
      captions (evaluation: the reference keeps the first row per clip; the scorer needs all
      five references).
    exclude_ids: YouTube ids to leave out (the reference's `missing_ids`).
    require_media: skip rows whose file is absent (the reference keeps only present clips).
  """
  records = read_records(csv_path)

  def to_example(i, rec):
    youtube_id, start, path = _clip(rec, audio_root, exclude_ids)
    caption = str(field(rec, "caption"))
    return Example(
        id=str(rec.get("audiocap_id") or i), modality="audio", media=path, task="caption",
        text_output=caption, dataset=dataset,
        meta={"youtube_id": youtube_id, "start_time": start, "caption": caption})

  examples = build(records, to_example, dataset=dataset, require_media=require_media)
  if not one_per_clip:
    return examples
  grouped: dict[str, Example] = {}
  for ex in examples:
    key = ex.meta["youtube_id"]
    if key in grouped:
      refs = grouped[key].text_output
      grouped[key] = grouped[key].replace(text_output=(*refs, ex.text_output))
    else:
      grouped[key] = ex.replace(id=key, text_output=(ex.text_output,))
  return Examples(grouped.values(), skipped=examples.skipped)


def read_audiocaps_qa(csv_path: str | os.PathLike, audio_root: str | os.PathLike, *,
                      dataset: str = "audiocaps_qa", exclude_ids: Collection[str] = (),
                      require_media: bool = False) -> Examples:
  """QA examples: raw `question` -> `text_input`, raw `answer` -> `text_output`/`answers`.

  `meta["caption"]` keeps the clip's caption for the yes/no augmentation
  (`templates.instruct(..., binary_captions=...)`).
  """
  def to_example(i, rec):
    youtube_id, start, path = _clip(rec, audio_root, exclude_ids)
    answer = str(field(rec, "answer"))
    return Example(
        id=str(i), modality="audio", media=path, task="qa",
        text_input=str(field(rec, "question")), text_output=answer, answers=(answer,),
        dataset=dataset,
        meta={"youtube_id": youtube_id, "start_time": start, "caption": str(field(rec, "caption"))})
  return build(read_records(csv_path), to_example, dataset=dataset, require_media=require_media)
