"""Classification by likelihood ranking on our model (LAVIS `_predict_class`).

Each class name, formatted into the task's candidate template, follows the multimodal prompt
as the answer would in training: `[cue][soft tokens][instruction][candidate]`, the candidate
tokenised without BOS and without EOS, supervised on its own tokens only. Its score is the
summed token NLL (LAVIS' per-row mean over equal-length padded rows ranks the same way), the
loss path of training (`assembly.assemble` + `causal_lm_loss`'s shifted targets) per row.
`classification.rank_candidates` then takes the argmin.

`make_candidate_nll` scores every candidate of a batch in one compiled program: the encoders
and Q-Former run once per batch, then the LLM runs once per candidate (`lax.map`, one batch
of rows in memory at a time). One program per (batch shape, candidate count, modality order).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from xblip_jax.data import text as text_lib
from xblip_jax.models import assembly
from xblip_jax.train.step import StepShardings, _eval_jit, soft_tokens

TEXT_KEYS = ("llm_text_ids", "llm_text_mask", "llm_text_labels")
CAND = "cand_"  # batch keys of the (B, C, T) candidate text arrays


def row_nll(logits: Float[Array, "B T V"], labels: Int[Array, "B T"]) -> Float[Array, "B"]:
  """Summed next-token NLL of each row's supervised tokens."""
  targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], text_lib.IGNORE)],
                            axis=1)
  valid = targets != text_lib.IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0), axis=-1)


def _text_nll(model, soft: dict, text: dict, prompt: assembly.PromptIds, order) -> Array:
  embeds, mask, labels = assembly.assemble(
      model.llm.embed, soft, text["llm_text_ids"], text["llm_text_mask"],
      text["llm_text_labels"], prompt, order, layout=model.cfg.layout,
      use_cues=model.cfg.use_cues)
  return row_nll(model.llm(embeds, attention_mask=mask).logits, labels)


def make_sequence_nll(graphdef, prompt: assembly.PromptIds) -> Callable:
  """`nll(params, rest, batch, order) -> (B,)` summed NLL of each row's `llm_text_labels`."""

  def nll(params, rest, batch, order):
    model = nnx.merge(graphdef, params, rest)
    soft = soft_tokens(model, batch, order, deterministic=True)
    return _text_nll(model, soft, batch, prompt, order)

  return jax.jit(nll, static_argnums=(3,))


def make_candidate_nll(graphdef, prompt: assembly.PromptIds,
                       shardings: StepShardings | None = None) -> Callable:
  """`nll(params, rest, batch, order) -> (B, C)` summed NLL of every candidate of every row.

  `batch` holds the media and Q-Former text of the rows and `cand_llm_text_*` arrays of shape
  (B, C, T) (`candidate_batch`); its own `llm_text_*` arrays are not read.
  """

  def nll(params, rest, batch, order):
    model = nnx.merge(graphdef, params, rest)
    soft = soft_tokens(model, batch, order, deterministic=True)
    per_cand = {k: jnp.swapaxes(batch[CAND + k], 0, 1) for k in TEXT_KEYS}  # (C, B, T)
    out = jax.lax.map(lambda text: _text_nll(model, soft, text, prompt, order), per_cand)
    return jnp.swapaxes(out, 0, 1)

  return _eval_jit(nll, shardings)


def candidate_arrays(encoder: text_lib.TextEncoder, instruction: str,
                     candidate: str) -> dict[str, np.ndarray]:
  """The LLM text arrays of `[instruction][candidate]`, labels on the candidate only."""
  tok, cfg = encoder.llm_tok, encoder.cfg
  ids = text_lib.encode_instruction(tok, instruction, cfg)
  cand = tok.encode(candidate, add_bos=True)[1:]  # BOS dropped, no EOS
  return text_lib.llm_text_block(ids, cand, cfg.llm_text_len, tok.pad_id)


def candidate_batch(encoder: text_lib.TextEncoder, instructions: Sequence[str],
                    candidates: Sequence[str]) -> dict[str, np.ndarray]:
  """`cand_llm_text_*` arrays (rows, candidates, T): row i's instruction with every candidate."""
  if not candidates:
    raise ValueError("classification by ranking needs at least one candidate")
  rows = [[candidate_arrays(encoder, ins, c) for c in candidates] for ins in instructions]
  return {CAND + k: np.stack([np.stack([a[k] for a in row]) for row in rows])
          for k in TEXT_KEYS}


def candidate_losses(nll: Callable, params, rest, batch: dict, order: tuple[str, ...],
                     encoder: text_lib.TextEncoder, instructions: Sequence[str],
                     candidates: Sequence[str]) -> np.ndarray:
  """(rows, candidates) summed NLLs through `make_candidate_nll`'s `nll`; `batch` supplies
  the media and Q-Former text, one instruction per row."""
  rows = len(next(iter(batch.values())))
  if len(instructions) != rows:
    raise ValueError(f"{len(instructions)} instructions for a batch of {rows} rows")
  text = candidate_batch(encoder, instructions, candidates)
  return np.asarray(nll(params, rest, {**batch, **text}, order))
