"""Golden check of the LLM side: projections, prefix assembly (both layouts), loss and logits.

The reference bypassed encoders and Q-Formers and fed given Q-Former outputs; we do the same:
`llm_proj[m]` on their query rows, regrouped per sample, then `XInstructBlip.__call__`.
Weights load through the project's LAVIS key table (`convert/xblip_keys.py`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xblip_jax.convert import mapping, xblip_keys
from xblip_jax.data import text as text_lib
from xblip_jax.golden.case import Case, Comparison, compare
from xblip_jax.models import assembly
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip

# Output-name prefix of each layout in the golden file.
LAYOUT_OUTPUTS = (("reference_forward", ""), ("single", "fixed_"))


def build(case: Case, layout: str) -> XInstructBlip:
  cfg = case.meta["config"]
  order = tuple(cfg["modalities_order"])
  qh = cfg["qformer_hidden"]
  xcfg = XBlipConfig(
      encoder_widths=tuple((m, qh) for m in order),
      qformer=QFormerConfig.tiny(hidden_size=qh, num_layers=1, num_heads=1, intermediate_size=qh),
      llm=LlamaConfig.from_hf(cfg["llm_config"], vocab_size=cfg["len_llm_tokenizer"]),
      num_query_tokens=cfg["num_query_token"], layout=layout, use_cues=cfg["use_cues"])
  model = XInstructBlip(xcfg, rngs=nnx.Rngs(0))
  # The case holds the LLM and the projections only (Q-Formers were bypassed).
  rules = xblip_keys.llm_rules(xcfg) + [r for r in xblip_keys.bridge_rules(xcfg)
                                        if r.ours[0].startswith("llm_proj.")]
  mapping.load_state_dict(model, rules, case.params, ignore=xblip_keys.ignore_patterns(xcfg))
  return model


def prompt_ids(case: Case) -> assembly.PromptIds:
  cfg = case.meta["config"]
  return assembly.PromptIds(
      prefix=tuple(case.inputs["prefix_input_ids"][0].tolist()),
      cues=tuple((m, tuple(case.inputs[f"cue_{m}_input_ids"][0].tolist()))
                 for m in cfg["modalities_order"]),
      clean_tokenization=cfg["clean_tokenization"])


def text_block(case: Case) -> dict[str, np.ndarray]:
  """The reference's tokenizer outputs turned into our fixed-length text block."""
  pad = case.meta["config"]["len_llm_tokenizer"] - 1
  ins, outs = case.inputs["text_input_ids"], case.inputs["text_output_ids"]
  ins_m = case.inputs["text_input_attention_mask"]
  outs_m = case.inputs["text_output_attention_mask"]
  length = ins.shape[1] + outs.shape[1] - 1  # the answer's BOS is dropped
  rows = [text_lib.llm_text_block(ins[b][ins_m[b] == 1].tolist(),
                                  outs[b][outs_m[b] == 1][1:].tolist(), length, pad)
          for b in range(ins.shape[0])]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def check(case: Case) -> list[Comparison]:
  cfg = case.meta["config"]
  order = tuple(cfg["modalities_order"])
  nq = cfg["num_query_token"]
  block = text_block(case)
  batch = block["llm_text_ids"].shape[0]
  results = [compare("llm_tokens_input_ids", block["llm_text_ids"],
                     case.outputs["llm_tokens_input_ids"]),
             compare("llm_tokens_attention_mask", block["llm_text_mask"],
                     case.outputs["llm_tokens_attention_mask"])]
  for layout, out_prefix in LAYOUT_OUTPUTS:
    if out_prefix + "loss" not in case.outputs:
      continue
    model = build(case, layout)
    soft = {}
    for m in order:
      rows = jnp.asarray(case.inputs[f"{m}_qformer_last_hidden_state"][:, :nq])
      soft[m] = model.llm_proj[m](rows).reshape(batch, -1, model.cfg.llm.hidden_size)
      if not out_prefix:
        results.append(compare(f"inputs_llm_{m}", soft[m], case.outputs[f"inputs_llm_{m}"]))
    ids, mask, labels = (jnp.asarray(block[k]) for k in
                         ("llm_text_ids", "llm_text_mask", "llm_text_labels"))
    embeds, att, lab = assembly.assemble(model.llm.embed, soft, ids, mask, labels,
                                         prompt_ids(case), order, layout=layout,
                                         use_cues=model.cfg.use_cues)
    out = model(soft, ids, mask, labels, prompt_ids(case), order)
    results += [
        compare(out_prefix + "inputs_embeds", embeds, case.outputs[out_prefix + "inputs_embeds"]),
        compare(out_prefix + "attention_mask", att, case.outputs[out_prefix + "attention_mask"]),
        compare(out_prefix + "labels", lab, case.outputs[out_prefix + "labels"]),
        compare(out_prefix + "loss", out.loss, case.outputs[out_prefix + "loss"], rtol=0),
        compare(out_prefix + "logits", out.logits, case.outputs[out_prefix + "logits"]),
    ]
  return results
