"""Key mapping of the whole trainable bridge and LLM against LAVIS `Blip2VicunaXInstruct` names.

Per modality m (LAVIS attribute names): `{m}_ln`, `{m}_Qformer.bert.*`, `{m}_query_tokens`,
`{m}_llm_proj`; the LLM under `llm_model.`. Frozen encoders have their own tables
(`eva_vit_keys`, `beats_keys`, `pointbert_keys`) under `{m}_encoder.`.
"""

from __future__ import annotations

import dataclasses

from xblip_jax.convert import llama_keys, qformer_keys
from xblip_jax.convert.mapping import Rule, copy, layer_norm, linear, prefixed
from xblip_jax.models.xblip import XBlipConfig


def bridge_rules(cfg: XBlipConfig) -> list[Rule]:
  """`ln`, `qformer`, `query_tokens`, `llm_proj` (and shared-variant parts) of every modality."""
  rules: list[Rule] = []
  for m in cfg.modalities:
    rules += layer_norm(f"ln.{m}", f"{m}_ln")
    if cfg.shared_qformer:
      rules += linear(f"encoder_proj.{m}", f"{m}_encoder_projection")
  keys = ("shared",) if cfg.shared_qformer else cfg.modalities
  for k in keys:
    if cfg.projection_only:
      rules += linear(f"llm_proj.{k}", f"{k}_projection")
      continue
    width = cfg.shared_qformer_width if cfg.shared_qformer else cfg.width(k)
    qcfg = dataclasses.replace(cfg.qformer, encoder_width=width,
                               num_query_tokens=cfg.num_query_tokens)
    rules += prefixed(qformer_keys.lavis_rules(qcfg), f"qformer.{k}.", f"{k}_Qformer.")
    rules.append(copy(f"query_tokens.{k}", f"{k}_query_tokens"))
    rules += linear(f"llm_proj.{k}", f"{k}_llm_proj")
  return rules


def llm_rules(cfg: XBlipConfig) -> list[Rule]:
  return prefixed(llama_keys.hf_rules(cfg.llm), "llm.", "llm_model.")


def ignore_patterns(cfg: XBlipConfig) -> tuple[str, ...]:
  """Expected, unused LAVIS keys: Q-Former `position_ids` buffers, LLaMA `inv_freq` buffers."""
  keys = ("shared",) if cfg.shared_qformer else cfg.modalities
  out = tuple(f"{k}_Qformer\\.{p}" for k in keys for p in qformer_keys.LAVIS_IGNORE)
  return out + tuple(f"llm_model\\.{p}" for p in llama_keys.LAVIS_IGNORE)
