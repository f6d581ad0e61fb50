"""Golden check of the Q-Former against LAVIS `BertModel` (cases `qformer_*`).

Everything (sizes, layer count, query count, which inputs exist) comes from the case; the call
reproduced is the json's `call`:
`bert(input_ids, attention_mask=cat([ones(B, Q), text_mask]), query_embeds=query_tokens,
encoder_hidden_states, encoder_attention_mask)`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xblip_jax.convert.mapping import load_state_dict
from xblip_jax.convert.qformer_keys import LAVIS_IGNORE, lavis_rules
from xblip_jax.golden.case import Case, Comparison, compare
from xblip_jax.models.layers import Precision
from xblip_jax.models.qformer import QFormer, QFormerConfig

ATOL = RTOL = 1e-5


def config_from_meta(meta: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> QFormerConfig:
  """The QFormerConfig of a case: its BertConfig json plus `num_query_token`."""
  c = meta["config"]
  if c.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"only the exact GELU is implemented, case uses {c['hidden_act']!r}")
  if c.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"only absolute positions are implemented, got {c['position_embedding_type']!r}")
  if not c.get("add_cross_attention", True):
    raise ValueError("the case's config has no cross-attention")
  return QFormerConfig(
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=c["num_attention_heads"],
      intermediate_size=c["intermediate_size"],
      max_position_embeddings=c["max_position_embeddings"],
      layer_norm_eps=c["layer_norm_eps"],
      encoder_width=c["encoder_width"],
      cross_attention_freq=c["cross_attention_freq"],
      num_query_tokens=int(meta.get("num_query_token", c.get("query_length"))),
      hidden_dropout=c["hidden_dropout_prob"],
      attention_dropout=c["attention_probs_dropout_prob"],
      # LAVIS deletes the word embeddings when qformer_text_input is False.
      text_input="bert.embeddings.word_embeddings.weight" in params,
  )


def check(case: Case) -> list[Comparison]:
  cfg = config_from_meta(case.meta, case.params)
  # Built abstractly: every parameter comes from the case, so random init would be wasted work.
  model = nnx.eval_shape(lambda: QFormer(cfg, precision=Precision.float32(), rngs=nnx.Rngs(0)))
  load_state_dict(model, lavis_rules(cfg), case.params, ignore=LAVIS_IGNORE + ("query_tokens",))
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, queries, enc, text, encoder_mask):
    return nnx.merge(graphdef, state)(queries, enc, encoder_mask=encoder_mask,
                                      return_hidden_states=True, **text)

  inp = case.inputs
  enc = jnp.asarray(inp["encoder_hidden_states"])
  batch = enc.shape[0]
  queries = jnp.broadcast_to(jnp.asarray(case.params["query_tokens"]),
                             (batch, cfg.num_query_tokens, cfg.hidden_size))
  text = {}
  if "input_ids" in inp:
    text = dict(input_ids=jnp.asarray(inp["input_ids"]),
                text_mask=jnp.asarray(inp["text_attention_mask"]))

  def run(encoder_mask_name: str):
    mask = inp.get(encoder_mask_name)
    return apply(state, queries, enc, text, None if mask is None else jnp.asarray(mask))

  out = run("encoder_attention_mask")
  got = {"last_hidden_state": out.last_hidden_state, "query_output": out.query_output}
  got.update({f"hidden_states_{i}": h for i, h in enumerate(out.hidden_states)})
  if "encoder_attention_mask_variant" in inp:
    got["last_hidden_state_encmask_variant"] = run(
        "encoder_attention_mask_variant").last_hidden_state

  results = []
  for name, want in case.outputs.items():
    if name not in got:
      results.append(Comparison(f"{name} (not produced)", float("inf"), ATOL, RTOL, False))
      continue
    results.append(compare(name, got[name], want, atol=ATOL, rtol=RTOL))
  return results
