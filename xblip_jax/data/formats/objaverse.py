"""Objaverse (Cap3D) 3D captions and the generated 3D QA, as CSV files.

Point clouds follow ULIP's Objaverse release: `{pc_root}/{uid}/{uid}_8192.npz` (array `arr_0`,
xyz). Captions (`cap3d_cap_final_{train,val}.csv`): a header with `sample_id` and the caption in
`caption` or `data` (the reference's column name); Cap3D's own header-less `uid,caption` file is
read too. QA (`CAP3DQA_final.csv`): `sample_id,caption,question,answer` (+ generator flags).
"""

from __future__ import annotations

import csv
import os

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, first_field, read_records

PC_PATTERN = "{uid}/{uid}_8192.npz"


def pc_path(pc_root: str | os.PathLike, uid: str, pattern: str = PC_PATTERN) -> str:
  """Path of one object's point cloud (`pattern` may also name `.npy` or `.ply` files)."""
  return os.path.join(pc_root, pattern.format(uid=uid))


def _caption_records(csv_path):
  with open(csv_path, newline="", encoding="utf-8") as f:
    first = next(csv.reader(f), [])
  if "sample_id" in first:
    return read_records(csv_path)
  with open(csv_path, newline="", encoding="utf-8") as f:  # Cap3D's header-less uid,caption
    return [{"sample_id": row[0], "caption": row[1]} if len(row) >= 2 else {}
            for row in csv.reader(f)]


def read_cap3d_caption(csv_path: str | os.PathLike, pc_root: str | os.PathLike, *,
                       dataset: str = "objaverse_caption", pattern: str = PC_PATTERN,
                       require_media: bool = False) -> Examples:
  """Caption examples, one per object.

  The reference draws `random.choice(ann["data"])`, which picks one CHARACTER when the cell is
  a plain string; here the whole caption is the target.
  """
  def to_example(i, rec):
    uid = str(field(rec, "sample_id"))
    caption = str(first_field(rec, ("caption", "data")))
    return Example(id=uid, modality="pc", media=pc_path(pc_root, uid, pattern), task="caption",
                   text_output=caption, dataset=dataset, meta={"caption": caption})
  return build(_caption_records(csv_path), to_example, dataset=dataset,
               require_media=require_media)


def read_cap3d_qa(csv_path: str | os.PathLike, pc_root: str | os.PathLike, *,
                  dataset: str = "objaverse_qa", pattern: str = PC_PATTERN,
                  remove_model_answer: bool = False, require_media: bool = False) -> Examples:
  """QA examples; `meta["caption"]` keeps the object's caption for yes/no questions.

  Args:
    remove_model_answer: drop rows whose answer contains "model" (the reference's
      `remove_model_answer`, set in its 3D QA training config).
  """
  def to_example(i, rec):
    uid = str(field(rec, "sample_id"))
    answer = str(field(rec, "answer"))
    if remove_model_answer and "model" in answer:
      raise RecordError("answer mentions 'model'")
    return Example(id=str(i), modality="pc", media=pc_path(pc_root, uid, pattern), task="qa",
                   text_input=str(field(rec, "question")), text_output=answer,
                   answers=(answer,), dataset=dataset,
                   meta={"sample_id": uid, "caption": str(field(rec, "caption"))})
  return build(read_records(csv_path), to_example, dataset=dataset, require_media=require_media)
