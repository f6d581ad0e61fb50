"""Key table: transformers `InstructBlipForConditionalGeneration` <-> our `XInstructBlip` paths.

HF has one vision branch; it maps onto one modality `m` (image, or video, whose encoder is the
same EVA ViT):

  qformer.*                     <-> qformer.{m}.*   (`qformer_keys.hf_rules`)
  query_tokens                  <-> query_tokens.{m}
  language_projection.*         <-> llm_proj.{m}.*
  vision_model.post_layernorm.* <-> ln.{m}.*        (LAVIS `{m}_ln`; HF eps = vision eps)
  vision_model.*                <-> encoders.{m}.*  (`eva_vit_keys.hf_rules`)
  language_model.*              <-> llm.*           (`llama_keys.hf_rules`)

Key names checked against the transformers 5.23 model's `state_dict()`.
"""

from __future__ import annotations

from xblip_jax.convert import eva_vit_keys, llama_keys, qformer_keys
from xblip_jax.convert.mapping import Rule, copy, layer_norm, linear, prefixed
from xblip_jax.models.encoders.eva_vit import EvaViTConfig
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig

BRIDGE_PREFIXES = ("qformer.", "query_tokens", "language_projection.",
                   "vision_model.post_layernorm.")
VISION_PREFIX = "vision_model."
LLM_PREFIX = "language_model."
BRIDGE_IGNORE = tuple(f"qformer\\.{p}" for p in qformer_keys.HF_IGNORE)


def bridge_rules(cfg: QFormerConfig, modality: str) -> list[Rule]:
  return (prefixed(qformer_keys.hf_rules(cfg), f"qformer.{modality}.", "qformer.")
          + [copy(f"query_tokens.{modality}", "query_tokens")]
          + linear(f"llm_proj.{modality}", "language_projection")
          + layer_norm(f"ln.{modality}", "vision_model.post_layernorm"))


def vision_rules(cfg: EvaViTConfig, modality: str) -> list[Rule]:
  return prefixed(eva_vit_keys.hf_rules(cfg), f"encoders.{modality}.", VISION_PREFIX)


def llm_rules(cfg: LlamaConfig) -> list[Rule]:
  return prefixed(llama_keys.hf_rules(cfg), "llm.", LLM_PREFIX)
