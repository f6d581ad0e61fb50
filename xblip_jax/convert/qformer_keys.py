"""Q-Former key tables: our NNX paths <-> LAVIS `bert.*` and transformers `InstructBlipQFormerModel`.

LAVIS names (the Q-Former module's own state dict; a full Blip2VicunaXInstruct state dict
prefixes `<modality>_Qformer.`, pass that as `load_state_dict(prefix=...)`):

  bert.embeddings.{word_embeddings,position_embeddings}.weight, bert.embeddings.LayerNorm.*
  bert.encoder.layer.<i>.attention.self.{query,key,value}.*, .attention.output.{dense,LayerNorm}.*
  bert.encoder.layer.<i>.crossattention.self.{query,key,value}.*, .crossattention.output.*
  bert.encoder.layer.<i>.{intermediate,output}.* (text FFN), .{intermediate,output}_query.* (query)

transformers renames them: no `bert.` prefix, `.self.` -> `.attention.`, `embeddings.LayerNorm`
-> `embeddings.layernorm` (checked against the transformers 5.23 model's `state_dict()`).
"""

from __future__ import annotations

from xblip_jax.convert.mapping import Rule, embedding, layer_norm, linear, rule
from xblip_jax.models.qformer import QFormerConfig

# Source keys that exist but are deliberately unused: the `position_ids` buffer (LAVIS saves it,
# persistent) and the BLIP-2 stage-1 LM head `cls.*` (X-InstructBLIP sets `Qformer.cls = None`).
LAVIS_IGNORE: tuple[str, ...] = (r"bert\.embeddings\.position_ids", r"cls\..*")
HF_IGNORE: tuple[str, ...] = (r"embeddings\.position_ids",)


def _attention(ours: str, theirs: str) -> list[Rule]:
  rules = []
  for proj in ("query", "key", "value"):
    rules += linear(f"{ours}.{proj}", f"{theirs}.self.{proj}")
  rules += linear(f"{ours}.out", f"{theirs}.output.dense")
  rules += layer_norm(f"{ours}.norm", f"{theirs}.output.LayerNorm")
  return rules


def _ffn(ours: str, theirs: str, suffix: str) -> list[Rule]:
  return (linear(f"{ours}.intermediate", f"{theirs}.intermediate{suffix}.dense")
          + linear(f"{ours}.output", f"{theirs}.output{suffix}.dense")
          + layer_norm(f"{ours}.norm", f"{theirs}.output{suffix}.LayerNorm"))


def lavis_rules(cfg: QFormerConfig) -> list[Rule]:
  """Every Q-Former parameter against its LAVIS key (relative to the Q-Former module)."""
  rules: list[Rule] = []
  if cfg.text_input:
    rules.append(embedding("embeddings.word_embeddings", "bert.embeddings.word_embeddings"))
    rules.append(embedding("embeddings.position_embeddings",
                           "bert.embeddings.position_embeddings"))
  rules += layer_norm("embeddings.norm", "bert.embeddings.LayerNorm")
  for i in range(cfg.num_layers):
    ours, theirs = f"layers.{i}", f"bert.encoder.layer.{i}"
    rules += _attention(f"{ours}.attention", f"{theirs}.attention")
    if cfg.has_cross_attention(i):
      rules += _attention(f"{ours}.cross_attention", f"{theirs}.crossattention")
    rules += _ffn(f"{ours}.query_ffn", theirs, "_query")
    if cfg.text_input:
      rules += _ffn(f"{ours}.text_ffn", theirs, "")
  return rules


def lavis_to_hf_key(key: str) -> str:
  """A LAVIS Q-Former key under its `transformers.InstructBlipQFormerModel` name."""
  if key.startswith("bert."):
    key = key[len("bert."):]
  key = key.replace(".self.", ".attention.")
  return key.replace("embeddings.LayerNorm", "embeddings.layernorm")


def hf_rules(cfg: QFormerConfig) -> list[Rule]:
  """Every Q-Former parameter against its `InstructBlipQFormerModel` state-dict key."""
  return [rule(r.ours, tuple(lavis_to_hf_key(k) for k in r.theirs), r.to_ours, r.to_theirs)
          for r in lavis_rules(cfg)]
