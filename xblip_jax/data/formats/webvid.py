"""WebVid-2M video captions.

Annotation (`webvid2m/annotations/train.json`, or WebVid's own `results_2M_train.csv`):
records with `videoid` and `name` (the caption; `contentUrl`, `duration`, `page_dir` unused).
The video is `{video_root}/{videoid}.mp4`. The reference retries the next three records when
a video fails to load and then crashes; here a bad video is skipped and counted.
"""

from __future__ import annotations

import os

from xblip_jax.data.example import Example, Examples
from xblip_jax.data.formats import build, field, read_records


def read_webvid(ann_path: str | os.PathLike, video_root: str | os.PathLike, *,
                dataset: str = "webvid2m", require_media: bool = False) -> Examples:
  """Caption examples, one per video."""
  def to_example(i, rec):
    video_id = str(field(rec, "videoid"))
    return Example(id=video_id, modality="video",
                   media=os.path.join(video_root, f"{video_id}.mp4"), task="caption",
                   text_output=str(field(rec, "name")), dataset=dataset,
                   meta={"image_id": video_id})
  return build(read_records(ann_path), to_example, dataset=dataset, require_media=require_media)
