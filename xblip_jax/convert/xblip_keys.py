"""Key mapping of the whole trainable bridge and LLM against LAVIS `Blip2VicunaXInstruct` names.

Per modality m (LAVIS attribute names): `{m}_ln`, `{m}_Qformer.bert.*`, `{m}_query_tokens`,
`{m}_llm_proj`; the LLM under `llm_model.`. Frozen encoders have their own tables
(`eva_vit_keys`, `beats_keys`, `pointbert_keys`) under `{m}_encoder.`.
"""

from __future__ import annotations

import dataclasses

from xblip_jax.convert import (beats_keys, eva_vit_keys, llama_keys, pointbert_keys,
                               qformer_keys)
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


# Where each frozen encoder's own keys sit in the LAVIS state dict.
ENCODER_PREFIXES = {"image": "image_encoder.", "video": "video_encoder.",
                    "audio": "audio_encoder.model.", "pc": "pc_encoder."}


def encoder_rules(modality: str, enc_cfg) -> list[Rule]:
  """The frozen encoder of `modality` (`encoders.{m}.*`) against its LAVIS names."""
  table = {"image": eva_vit_keys.lavis_rules, "video": eva_vit_keys.lavis_rules,
           "audio": beats_keys.rules, "pc": pointbert_keys.rules}
  if modality not in table:
    raise ValueError(f"no encoder table for modality {modality!r}")
  return prefixed(table[modality](enc_cfg), f"encoders.{modality}.", ENCODER_PREFIXES[modality])
