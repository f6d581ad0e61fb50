"""Key table: a Hugging Face BERT (`BertModel` / `BertForPreTraining`) -> a Q-Former, for init.

BLIP-2 starts its Q-Former from `bert-base-uncased`: the embeddings, self-attention and text
FFN load by name, the `[DEC]` row added to the vocabulary is new, the cross-attention layers
(which BERT lacks) stay randomly initialised, and then every query FFN (`*_query`) is copied
from the text FFN of its layer. This table does the same: each query-FFN parameter reads the
text FFN's source key.

Source keys are written with the `bert.` prefix of `BertForPreTraining`; a bare `BertModel` file
is read through a view that drops it. BERT's token-type table has no counterpart (LAVIS'
`BertEmbeddings` has none), nor do the pooler and the pre-training heads: see `IGNORE`.
"""

from __future__ import annotations

import numpy as np

from xblip_jax.convert import qformer_keys
from xblip_jax.convert.mapping import Rule, rule
from xblip_jax.models.qformer import QFormerConfig

IGNORE: tuple[str, ...] = (r"bert\.embeddings\.position_ids",
                           r"bert\.embeddings\.token_type_embeddings\.weight",
                           r"bert\.pooler\..*", r"cls\..*")
ROW_INITS = ("mean", "zeros")


def extra_rows(x: np.ndarray, rows: int, init: str, axis: int = 0) -> np.ndarray:
  """`x` with `rows` new rows (along `axis`): the mean of the existing rows, or zeros."""
  if rows <= 0:
    return x
  if init not in ROW_INITS:
    raise ValueError(f"new-row init {init!r}; choose one of {ROW_INITS}")
  shape = list(x.shape)
  shape[axis] = rows
  new = (np.broadcast_to(x.astype(np.float64).mean(axis, keepdims=True), shape)
         if init == "mean" else np.zeros(shape))
  return np.concatenate([x, new.astype(x.dtype)], axis=axis)


def grow_rows(r: Rule, rows: int, init: str, axis: int = 0) -> Rule:
  """The same rule, appending `rows` new rows (along `axis` of our layout) on import."""

  def to_ours(*xs):
    (y,) = r.to_ours(*xs)
    return (extra_rows(y, rows, init, axis),)

  return rule(r.ours, r.theirs, to_ours, r.to_theirs)


def rules(cfg: QFormerConfig, bert_vocab_size: int, *, row_init: str = "mean") -> list[Rule]:
  """Q-Former parameters from BERT keys (`bert.`-prefixed); cross-attention is not covered.

  Args:
    cfg: the target Q-Former (its `vocab_size` may exceed BERT's: new rows are appended).
    bert_vocab_size: rows of the BERT word-embedding table.
    row_init: how appended rows start ("mean" of BERT's rows, or "zeros").
  """
  out: list[Rule] = []
  for r in qformer_keys.lavis_rules(cfg):
    name = r.ours[0]
    if ".cross_attention." in name:
      continue  # BERT has none: left at initialisation, as BLIP-2
    if ".query_ffn." in name:
      r = rule(r.ours, tuple(k.replace("_query.", ".") for k in r.theirs), r.to_ours,
               r.to_theirs)
    elif name == "embeddings.word_embeddings.embedding":
      r = grow_rows(r, cfg.vocab_size - bert_vocab_size, row_init)
    out.append(r)
  return out
