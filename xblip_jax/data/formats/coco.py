"""COCO-style image captions and VQA in LAVIS' annotation layout.

Captions (`coco_karpathy_{train,val,test}.json`; CC12M, CapFilt, VG, SBU use the same layout):
a JSON list of `{"image": relative path, "caption": str or list of str, "image_id": ...}`.
VQA (`vqa_train.json`, `okvqa_train.json`, `aokvqa_v1p0_train.json`, ...):
`{"image", "question", "answer": list or str (A-OKVQA: "direct_answers"), "question_id"}`.
"""

from __future__ import annotations

import os

from xblip_jax.data.example import Example, Examples
from xblip_jax.data.formats import build, field, first_field, one_or_many, read_records, text_list


def read_coco_caption(ann_path: str | os.PathLike, image_root: str | os.PathLike, *,
                      dataset: str = "coco_caption", require_media: bool = False) -> Examples:
  """Caption examples; a list of captions (eval files) becomes a tuple of references.

  `meta["image_id"]` keeps the annotation's image id (COCO ground truth is keyed by it).
  """
  def to_example(i, rec):
    image = field(rec, "image")
    return Example(
        id=str(i), modality="image", media=os.path.join(image_root, image), task="caption",
        text_output=one_or_many(field(rec, "caption")), dataset=dataset,
        meta={"image_id": rec.get("image_id", image)})
  return build(read_records(ann_path), to_example, dataset=dataset, require_media=require_media)


def read_coco_vqa(ann_path: str | os.PathLike, image_root: str | os.PathLike, *,
                  dataset: str = "coco_vqa", require_media: bool = False) -> Examples:
  """VQA examples: `text_input` = raw question, `text_output` = the distinct answers (one is
  drawn per visit, as the reference's `__getitem__` intends), `answers` = all answers with
  repeats (for VQA accuracy)."""
  def to_example(i, rec):
    answers = text_list(first_field(rec, ("answer", "answers", "direct_answers")))
    return Example(
        id=str(rec.get("question_id", i)), modality="image",
        media=os.path.join(image_root, field(rec, "image")), task="qa",
        text_input=str(field(rec, "question")), text_output=tuple(dict.fromkeys(answers)),
        answers=answers, dataset=dataset, meta={"image_id": rec.get("image_id")})
  return build(read_records(ann_path), to_example, dataset=dataset, require_media=require_media)
