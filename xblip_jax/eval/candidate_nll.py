"""Classification by likelihood ranking on our model (LAVIS `_predict_class`).

Each class name, formatted into the task's candidate template, follows the multimodal prompt
as the answer would in training: `[cue][soft tokens][instruction][candidate]`, the candidate
tokenised without BOS and without EOS, supervised on its own tokens only. Its score is the
summed token NLL (LAVIS' per-row mean over equal-length padded rows ranks the same way), the
loss path of training (`assembly.assemble` + `causal_lm_loss`'s shifted targets) per row.
`classification.rank_candidates` then takes the argmin.
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
from xblip_jax.train.step import soft_tokens


def row_nll(logits: Float[Array, "B T V"], labels: Int[Array, "B T"]) -> Float[Array, "B"]:
  """Summed next-token NLL of each row's supervised tokens."""
  targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], text_lib.IGNORE)],
                            axis=1)
  valid = targets != text_lib.IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0), axis=-1)


def make_sequence_nll(graphdef, prompt: assembly.PromptIds) -> Callable:
  """`nll(params, rest, batch, order) -> (B,)` summed NLL of each row's `llm_text_labels`."""

  def nll(params, rest, batch, order):
    model = nnx.merge(graphdef, params, rest)
    soft = soft_tokens(model, batch, order, deterministic=True)
    embeds, mask, labels = assembly.assemble(
        model.llm.embed, soft, batch["llm_text_ids"], batch["llm_text_mask"],
        batch["llm_text_labels"], prompt, order, layout=model.cfg.layout,
        use_cues=model.cfg.use_cues)
    return row_nll(model.llm(embeds, attention_mask=mask).logits, labels)

  return jax.jit(nll, static_argnums=(3,))


def candidate_arrays(encoder: text_lib.TextEncoder, instruction: str,
                     candidate: str) -> dict[str, np.ndarray]:
  """The LLM text arrays of `[instruction][candidate]`, labels on the candidate only."""
  tok, cfg = encoder.llm_tok, encoder.cfg
  ids = text_lib.encode_instruction(tok, instruction, cfg)
  cand = tok.encode(candidate, add_bos=True)[1:]  # BOS dropped, no EOS
  return text_lib.llm_text_block(ids, cand, cfg.llm_text_len, tok.pad_id)


def candidate_losses(nll: Callable, params, rest, batch: dict, order: tuple[str, ...],
                     encoder: text_lib.TextEncoder, instructions: Sequence[str],
                     candidates: Sequence[str]) -> np.ndarray:
  """(rows, candidates) summed NLLs; `batch` supplies the media and Q-Former text."""
  if len(instructions) != len(next(iter(batch.values()))):
    raise ValueError(f"{len(instructions)} instructions for a batch of "
                     f"{len(next(iter(batch.values())))} rows")
  out = []
  for cand in candidates:
    rows = [candidate_arrays(encoder, ins, cand) for ins in instructions]
    text = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    out.append(np.asarray(nll(params, rest, {**batch, **text}, order)))
  return np.stack(out, axis=-1)
