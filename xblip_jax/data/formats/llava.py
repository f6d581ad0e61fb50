"""LLaVA-Instruct-150K dialogues, reduced to one instruction/answer pair per image.

Annotation (`llava_instruct_150k.json`): a JSON list of `{"id", "image": "000000033471.jpg",
"conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", ...}, ...]}`,
images under COCO `train2017`. As the reference (`LLaVA150kInstructDataset`): only the FIRST
human/gpt turn is used, `<image>` is removed, and both sides pass through `blip_caption`
(lowercased, `.!"()*#:;~` removed, cut to 50 words; the answer too). No instruction template
is applied (the registry marks the dataset `instruct=False`), so the examples are final.
"""

from __future__ import annotations

import os

from xblip_jax.data.example import Example, Examples, RecordError
from xblip_jax.data.formats import build, field, read_records
from xblip_jax.data.templates import pre_caption


def read_llava_dialogue(ann_path: str | os.PathLike, image_root: str | os.PathLike, *,
                        dataset: str = "llava150k", require_media: bool = False) -> Examples:
  """One example per dialogue: first human turn -> `text_input`, first reply -> `text_output`."""
  def to_example(i, rec):
    image = str(field(rec, "image"))
    turns = field(rec, "conversations")
    if not isinstance(turns, list) or len(turns) < 2 or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
      raise RecordError("bad field 'conversations'")
    question = pre_caption(turns[0]["value"].replace("<image>", "").strip())
    answer = pre_caption(turns[1]["value"])
    if not question or not answer:
      raise RecordError("empty text")
    return Example(id=str(rec.get("id", i)), modality="image",
                   media=os.path.join(image_root, image), task="qa", text_input=question,
                   text_output=answer, answers=(answer,), dataset=dataset)
  return build(read_records(ann_path), to_example, dataset=dataset, require_media=require_media)
