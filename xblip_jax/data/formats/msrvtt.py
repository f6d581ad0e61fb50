"""MSR-VTT / MSVD video captions and QA in LAVIS' annotation layout.

Captions (`msrvtt/cap_{train,val,test}.json`): a JSON list of
`{"video": "video7010.mp4", "caption": str or list, "image_id": ...}`; QA (`qa_{split}.json`,
MSVD-QA alike): `{"video", "question", "answer", "question_id"}`. Paths are
`{video_root}/{video}`.
"""

from __future__ import annotations

import os

from xblip_jax.data.example import Example, Examples
from xblip_jax.data.formats import build, field, one_or_many, read_records, text_list


def read_video_caption(ann_path: str | os.PathLike, video_root: str | os.PathLike, *,
                       dataset: str = "msrvtt_caption", require_media: bool = False) -> Examples:
  """Caption examples; `meta["image_id"]` keeps the video id used by the caption scorer."""
  def to_example(i, rec):
    video = field(rec, "video")
    return Example(
        id=str(i), modality="video", media=os.path.join(video_root, video), task="caption",
        text_output=one_or_many(field(rec, "caption")), dataset=dataset,
        meta={"image_id": rec.get("image_id", video)})
  return build(read_records(ann_path), to_example, dataset=dataset, require_media=require_media)


def read_video_qa(ann_path: str | os.PathLike, video_root: str | os.PathLike, *,
                  dataset: str = "msrvtt_qa", require_media: bool = False) -> Examples:
  """QA examples: raw question in `text_input`, answer(s) in `text_output` and `answers`."""
  def to_example(i, rec):
    answers = text_list(field(rec, "answer"))
    return Example(
        id=str(rec.get("question_id", i)), modality="video",
        media=os.path.join(video_root, field(rec, "video")), task="qa",
        text_input=str(field(rec, "question")), text_output=tuple(dict.fromkeys(answers)),
        answers=answers, dataset=dataset)
  return build(read_records(ann_path), to_example, dataset=dataset, require_media=require_media)
