"""The paper's evaluation tasks as the reference configures them (spec 3.2, 3.3, 4.7).

Published numbers move by several points with the prompt, the decoding settings and the
scorer, so each task pins all three: `prompt` (LLM and Q-Former text, `{}` = the question after
`blip_question`), `decode` (a `DecodeConfig` preset with the eval yaml's values), `metric` (a
scorer in `eval/scoring.py`). `DEMO_SETS` maps the demo config's held-out sets onto them.
"""

from __future__ import annotations

import dataclasses

from xblip_jax.data.templates import blip_question
from xblip_jax.decode.api import DecodeConfig

METRICS = ("caption", "vqa", "gqa", "discrn", "class_rank", "class_gen")
DISCRN_PREFIX = ("You are given two inputs. Select exactly one of the two by referece to its "
                 "relative position (first or second, left or right) that best answers the "
                 "question. ")  # sic, as the reference spells it


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task.

  Attributes:
    name: registry key.
    modalities: inputs in prompt order.
    metric: one of `METRICS`.
    prompt: the LLM prompt; `{}` takes the processed question.
    decode: decoding settings (LAVIS `max_len`/`min_len` converted, see `DecodeConfig`).
    qformer_prompt: Q-Former text when it differs from the LLM prompt (DisCRn).
    prefix: LLM text before the first cue (DisCRn).
    candidates: classification by ranking: the template each class name fills.
    note: where the reference leaves something open.
  """

  name: str
  modalities: tuple[str, ...]
  metric: str
  prompt: str
  decode: DecodeConfig
  qformer_prompt: str | None = None
  prefix: str = ""
  candidates: str | None = None
  note: str = ""

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"task {self.name}: metric {self.metric!r} not in {METRICS}")

  def format_prompt(self, question: str | None = None) -> str:
    """The LLM prompt of one example (captioning prompts take no question)."""
    if "{}" not in self.prompt:
      return self.prompt
    if question is None:
      raise ValueError(f"task {self.name}: its prompt needs a question")
    return self.prompt.format(blip_question(question))

  @property
  def empty_answer(self) -> str | None:
    """What an empty generated answer becomes (LAVIS `predict_answers`: "unanswerable")."""
    return "unanswerable" if self.metric in ("vqa", "gqa", "discrn") else None


_CAPTION = "a short description"
_IMAGE_QA = "based on the given the image respond to {}"  # sic
_QA = "Question: {} Answer:"


def _caption(name, modality, prompt=_CAPTION, **decode):
  return Task(name, (modality,), "caption", prompt, DecodeConfig.caption(**decode))


def _qa(name, modality, metric, prompt, note="", **decode):
  return Task(name, (modality,), metric, prompt, DecodeConfig.vqa(**decode), note=note)


_QA_3D = dict(max_new_tokens=79, length_penalty=0.0)  # max_len 80 counts the BOS (HF 4.33)
TASKS: dict[str, Task] = {t.name: t for t in (
    _caption("coco_caption", "image"),
    _caption("nocaps", "image"),
    _caption("flickr30k", "image"),
    _caption("audiocaps", "audio"),
    _caption("clotho", "audio"),
    _caption("msvd_caption", "video"),
    _caption("msrvtt_caption", "video"),
    _caption("cap3d", "pc", "describe the 3d model", length_penalty=0.0),
    _qa("vqav2", "image", "vqa", _IMAGE_QA,
        note="the reference ships no VQAv2 eval yaml; prompt and settings as OK-VQA"),
    _qa("okvqa", "image", "vqa", _IMAGE_QA),
    _qa("gqa", "image", "gqa", _IMAGE_QA),
    _qa("msvd_qa", "video", "gqa", _QA),
    _qa("msrvtt_qa", "video", "gqa", "based on the given video respond to {}"),
    _qa("clotho_aqa", "audio", "vqa", _QA),
    _qa("audiocaps_qa", "audio", "gqa", _QA),
    _qa("objaverse_qa", "pc", "gqa", "based on the given input respond to {}", **_QA_3D),
    Task("esc50", ("audio",), "class_rank", "describe the audio", DecodeConfig.vqa(),
         candidates="an audio of {}"),
    Task("esc50_gen", ("audio",), "class_gen", "descibe the audio",
         DecodeConfig.vqa(max_new_tokens=79, length_penalty=1.0),
         note="the model prompt, misspelt as in the reference, is what generate() uses (the "
              "run prompt 'describe the audio' is never read); run max_len 80, min_len 1, "
              "beams 5, length_penalty 1"),
    Task("modelnet40", ("pc",), "class_rank", "describe the 3d model.",
         DecodeConfig.vqa(max_new_tokens=2), candidates=" a 3d model of a {}"),
    Task("modelnet40_gen", ("pc",), "class_gen", "describe the 3d model",
         DecodeConfig.vqa(max_new_tokens=79, length_penalty=0.0)),
    Task("discrn_image_3d", ("image", "pc"), "discrn", "question: {} answer:",
         DecodeConfig.vqa(), qformer_prompt=_CAPTION, prefix=DISCRN_PREFIX),
    Task("discrn_audio_video", ("video", "audio"), "discrn", "question: {} answer:",
         DecodeConfig.vqa(), qformer_prompt=_CAPTION, prefix=DISCRN_PREFIX),
)}

# The demo config's held-out sets: its QA sets are scored like GQA (one answer each), its
# DisCRn sets like DisCRn, its classification sets (`data/demo_classification.py`) by ranking. Prompts come from the demo data's own templates.
DEMO_SETS = {"image_qa": "gqa", "video_qa": "msvd_qa", "audiocaps_qa": "audiocaps_qa",
             "pc_qa": "objaverse_qa", "discrn_image_pc": "discrn_image_3d",
             "discrn_video_audio": "discrn_audio_video", "audio_cls": "esc50",
             "pc_cls": "modelnet40"}


def for_eval_set(name: str, task: str | None = None) -> Task:
  """The task that scores an evaluation set: its own `task` field, else the demo mapping."""
  key = task or DEMO_SETS.get(name) or name
  if key not in TASKS:
    raise KeyError(f"evaluation set {name!r}: no task {key!r}; known: {sorted(TASKS)}")
  return TASKS[key]
