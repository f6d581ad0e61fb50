"""Key mapping: HF / LAVIS `LlamaForCausalLM` state dict <-> `xblip_jax.models.llm.llama.Llama`.

Our module paths mirror HF's, so the table is one-to-one: Linear `weight (out, in)` becomes a
`kernel (in, out)`, RMSNorm `weight` becomes `scale`, the embedding is copied. Inside a full
X-InstructBLIP checkpoint every key carries the prefix ``llm_model.``.

LAVIS' copy of `modeling_llama.py` (transformers 4.28-4.33 era) saves each layer's rotary
`inv_freq` as a persistent buffer; we recompute it, so those keys are ignored (`LAVIS_IGNORE`).
"""

from __future__ import annotations

from xblip_jax.convert.mapping import Rule, copy, embedding, linear
from xblip_jax.models.llm.llama import LlamaConfig

# Source keys (without prefix) that are expected and deliberately unused.
LAVIS_IGNORE: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

# With tied embeddings a torch state dict may still list `lm_head.weight` (same tensor).
TIED_IGNORE: tuple[str, ...] = (r"lm_head\.weight",)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


def hf_rules(cfg: LlamaConfig) -> list[Rule]:
  """The mapping table for a `Llama(cfg)` against HF `LlamaForCausalLM` keys."""
  rules: list[Rule] = [embedding("embed_tokens", "model.embed_tokens")]
  for i in range(cfg.num_layers):
    ours, theirs = f"layers.{i}", f"model.layers.{i}"
    for name in _ATTN:
      rules += linear(f"{ours}.self_attn.{name}", f"{theirs}.self_attn.{name}", bias=False)
    for name in _MLP:
      rules += linear(f"{ours}.mlp.{name}", f"{theirs}.mlp.{name}", bias=False)
    for name in _NORMS:
      rules.append(copy(f"{ours}.{name}.scale", f"{theirs}.{name}.weight"))
  rules.append(copy("norm.scale", "model.norm.weight"))
  if not cfg.tie_word_embeddings:
    rules += linear("lm_head", "lm_head", bias=False)
  return rules


def ignore_patterns(cfg: LlamaConfig, *, lavis: bool = True) -> tuple[str, ...]:
  """The `ignore=` patterns for `load_state_dict` of an HF or LAVIS LLaMA state dict."""
  return (LAVIS_IGNORE if lavis else ()) + (TIED_IGNORE if cfg.tie_word_embeddings else ())
