"""OCR-VQA (book covers): several question/answer pairs per image, one example per pair.

Annotation (`ocrvqa/annotations/ocrvqa.json`, the original release's `dataset.json`): a dict
keyed by the image id, or a list of records with `sample_id`; each holds parallel lists
`questions` and `answers` (plus `imageURL`, `title`, `genre`, `split`, unused). The image is
`{image_root}/{sample_id}.jpg`. The reference drops pairs whose image is absent when it builds
the dataset (`require_media=True` here).
"""

from __future__ import annotations

import os

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, read_records


def _pairs(records):
  """One record per (question, answer) pair; a record whose lists differ in length is kept
  whole so that `build` counts it as bad."""
  for rec in records:
    questions, answers = rec.get("questions"), rec.get("answers")
    if isinstance(questions, list) and isinstance(answers, list) and len(questions) == len(answers):
      for k, (q, a) in enumerate(zip(questions, answers)):
        yield {"sample_id": rec.get("sample_id"), "question": q, "answer": a, "k": k}
    else:
      yield {"sample_id": rec.get("sample_id"), "bad": True}


def read_ocr_vqa(ann_path: str | os.PathLike, image_root: str | os.PathLike, *,
                 dataset: str = "ocr_vqa", require_media: bool = True) -> Examples:
  """QA examples: raw question in `text_input`, the single answer in `text_output`/`answers`."""
  def to_example(i, rec):
    uid = str(field(rec, "sample_id"))
    if rec.get("bad"):
      raise RecordError("bad fields 'questions'/'answers'")
    answer = str(field(rec, "answer"))
    return Example(id=f"{uid}_{rec['k']}", modality="image",
                   media=os.path.join(image_root, f"{uid}.jpg"), task="qa",
                   text_input=str(field(rec, "question")), text_output=answer, answers=(answer,),
                   dataset=dataset, meta={"image_id": uid})
  return build(_pairs(read_records(ann_path)), to_example, dataset=dataset,
               require_media=require_media)
