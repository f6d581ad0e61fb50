"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) as LAVIS' `coco_caption_eval`.

LAVIS hands predictions and references to `pycocoevalcap`'s `COCOEvalCap`: both sides are PTB
tokenised (`eval/ptb.py`), then each scorer runs over the whole set (CIDEr's document
frequencies come from this set's references, so a subset scores differently than the whole).
`agg_metrics = CIDEr + Bleu_4`, LAVIS' model-selection number. SPICE is left out: it needs
Stanford CoreNLP models that pycocoevalcap downloads at first use. METEOR runs the bundled
Java jar, so without Java it is absent (with a one-time warning).
"""

from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

import numpy as np

from xblip_jax.eval import ptb

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   *, use_java: bool | None = None
                   ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(corpus metrics, per-example metrics) for `{id: caption}` against `{id: [refs]}`."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=import-outside-toplevel

  ids = list(predictions)
  if not ids or set(ids) != set(references) or any(not references[i] for i in ids):
    raise ValueError("score_captions needs the same non-empty ids on both sides, each with at "
                     "least one reference")
  use_java = ptb.java_available() if use_java is None else use_java
  gts = ptb.tokenize({i: list(references[i]) for i in ids}, use_java=use_java)
  res = ptb.tokenize({i: [predictions[i]] for i in ids}, use_java=use_java)
  metrics: dict[str, float] = {}
  per: dict[str, dict[str, float]] = {i: {} for i in ids}

  def put(name, corpus, rows):
    metrics[name] = float(corpus)
    for i, v in zip(ids, rows):
      per[i][name] = float(v)

  with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress
    corpus, rows = Bleu(4).compute_score(gts, res, verbose=0)
    for name, c, r in zip(BLEU, corpus, rows):
      put(name, c, r)
    if use_java:
      put("METEOR", *_meteor(gts, res))
    else:
      ptb.warn_no_java()
    put("ROUGE_L", *Rouge().compute_score(gts, res))
    put("CIDEr", *Cider().compute_score(gts, res))
  metrics["agg_metrics"] = metrics["CIDEr"] + metrics["Bleu_4"]
  return metrics, per


def _meteor(gts, res) -> tuple[float, np.ndarray]:
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=import-outside-toplevel

  scorer = Meteor()
  try:
    return scorer.compute_score(gts, res)
  finally:  # its Java process otherwise lives until garbage collection
    scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
