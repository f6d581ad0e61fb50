"""Exports: xblip_jax checkpoints (component checkpoints and/or trainer checkpoints) -> PyTorch.

* `lavis`: one `.pth` with LAVIS `Blip2VicunaXInstruct` key names, wrapped as `{"model": sd}`
  like the LAVIS runner saves (`{m}_Qformer.bert.*` incl. the `position_ids` buffer,
  `{m}_query_tokens`, `{m}_ln.*`, `{m}_llm_proj.*`, plus `llm_model.*` / `{m}_encoder.*` when
  those components are given).
* `hf-instructblip`: a transformers `InstructBlipForConditionalGeneration` folder (config.json +
  sharded safetensors) for one EVA-based branch (image or video).
* per component, the source formats the importers read: `hf-llama`, `eva-vit`, `beats`,
  `pointbert` (for round trips and for PyTorch users of one tower).

Tensors are converted rule by rule, reading our arrays in bounded chunks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from xblip_jax.convert import (beats_keys, bert_keys, eva_vit_keys, infer, instructblip_keys,
                               llama_keys, pointbert_keys, xblip_keys)
from xblip_jax.convert.engine import cast
from xblip_jax.convert.io import iter_chunks, shard_items, write_safetensors, write_torch
from xblip_jax.convert.mapping import CheckpointKeyError, Rule, copy, layer_norm, prefixed
from xblip_jax.convert.orbax_io import ArrayStore
from xblip_jax.models.encoders.beats import BeatsConfig
from xblip_jax.models.encoders.eva_vit import EvaViTConfig
from xblip_jax.models.encoders.pointbert import PointBertConfig
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.xblip import XBlipConfig

_ENCODER_CONFIGS = {"eva_vit": EvaViTConfig, "beats": BeatsConfig, "pointbert": PointBertConfig}
_CHUNK = 1 << 28  # bytes of our arrays read at a time


def _dataclass(cls, d: Mapping) -> Any:
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def bridges(store: ArrayStore) -> list[str]:
  rx = re.compile(r"(?:ln|qformer|query_tokens|llm_proj)\.([^.]+)")
  return sorted({m.group(1) for k in store.shapes if (m := rx.match(k))})


def encoders(store: ArrayStore) -> list[str]:
  return sorted({k.split(".")[1] for k in store.shapes if k.startswith("encoders.")})


def _meta(store: ArrayStore, root: str) -> dict:
  for meta in store.metas:
    if root in meta.get("roots", []):
      return meta
  raise CheckpointKeyError(f"the export needs the architecture of {root!r}, which only a "
                           "component checkpoint written by the importer records")


def llm_config(store: ArrayStore) -> tuple[LlamaConfig, dict]:
  cfg = _meta(store, "llm")["config"]
  lcfg = _dataclass(LlamaConfig, cfg["llm"])
  rows = store.shapes["llm.embed_tokens.embedding"][0][0]
  return dataclasses.replace(lcfg, vocab_size=rows), {**cfg["hf_config"], "vocab_size": rows}


def encoder_config(store: ArrayStore, m: str):
  cfg = _meta(store, f"encoders.{m}")["config"]
  name = next(k for k in _ENCODER_CONFIGS if k in cfg)
  return _dataclass(_ENCODER_CONFIGS[name], cfg[name]), cfg


def bridge_config(store: ArrayStore, m: str, heads: int | None = None) -> XBlipConfig:
  shapes = {k: v[0] for k, v in store.shapes.items()}
  recorded = next((meta["config"]["qformer"]["num_heads"] for meta in store.metas
                   if f"qformer.{m}" in meta.get("roots", [])), 12)
  qcfg, width, nq, hidden = infer.bridge_from_ours(shapes, m, num_heads=heads or recorded)
  llm = LlamaConfig.tiny(hidden_size=hidden, num_heads=1, num_kv_heads=1)
  return XBlipConfig(encoder_widths=((m, width),), qformer=qcfg, llm=llm, num_query_tokens=nq)


def _beats_tables(cfg: BeatsConfig, ours: str, theirs: str) -> list[Rule]:
  """Export-only: the tied relative table written under every layer, as BEATs saves it."""
  if not cfg.relative_position_embedding:
    return []
  key = theirs + "encoder.layers.{i}.self_attn.relative_attention_bias.weight"
  return [copy(ours + "encoder.relative_attention_bias", key.format(i=i))
          for i in range(1, cfg.encoder_layers)]


def stream(store: ArrayStore, rules: Sequence[Rule], *, dtype: str = "keep",
           allow_missing: bool = False, post: Mapping[str, Callable] | None = None,
           extra_unused_ok: Callable[[str], bool] = lambda k: False
           ) -> tuple[Iterator[tuple[str, np.ndarray]], list[str]]:
  """(iterator of (source key, array), missing our-paths); checks coverage before reading."""
  missing = sorted({k for r in rules for k in r.ours if k not in store.shapes})
  covered = {k for r in rules for k in r.ours}
  unused = sorted(k for k in store.shapes if k not in covered and not extra_unused_ok(k))
  if unused:
    raise CheckpointKeyError("arrays in the checkpoint(s) that this export has no name for:\n"
                             + "\n".join(f"  {k}" for k in unused))
  if missing and not allow_missing:
    raise CheckpointKeyError(f"{len(missing)} parameter(s) needed for the export are not in "
                             "the checkpoint(s):\n" + "\n".join(f"  {k}" for k in missing)
                             + "\nPass --allow-missing to write a partial result.")
  usable = [r for r in rules if all(k in store.shapes for k in r.ours)]

  def items():
    size = lambda i: sum(store.nbytes(k) for k in usable[i].ours)
    for chunk in iter_chunks(list(range(len(usable))), size, _CHUNK):
      arrays = store.read(sorted({k for i in chunk for k in usable[i].ours}))
      for i in chunk:
        r = usable[i]
        values = r.to_theirs(*(arrays[k] for k in r.ours))
        for key, value in zip(r.theirs, values, strict=True):
          value = np.ascontiguousarray(cast(np.asarray(value), dtype, arrays[r.ours[0]].dtype))
          if post and key in post:
            value = post[key](value)
          yield key, value
      del arrays

  return items(), missing


def lavis(store: ArrayStore, out: str, *, dtype: str = "keep", wrap: bool = True,
          allow_missing: bool = False, qformer_heads: int | None = None) -> list[str]:
  """Everything in `store` under LAVIS X-InstructBLIP names, saved as LAVIS does."""
  rules: list[Rule] = []
  buffers: dict[str, np.ndarray] = {}
  for m in bridges(store):
    if f"query_tokens.{m}" not in store.shapes:  # e.g. only the LN of an `eva-vit --with-ln`
      rules += layer_norm(f"ln.{m}", f"{m}_ln")
      continue
    cfg = bridge_config(store, m, qformer_heads)
    rules += xblip_keys.bridge_rules(cfg)
    if cfg.qformer.text_input:  # LAVIS saves this persistent buffer with the Q-Former
      buffers[f"{m}_Qformer.bert.embeddings.position_ids"] = np.arange(
          cfg.qformer.max_position_embeddings, dtype=np.int64)[None]
  if any(k.startswith("llm.") for k in store.shapes):
    rules += prefixed(llama_keys.hf_rules(llm_config(store)[0]), "llm.", "llm_model.")
  for m in encoders(store):
    cfg, _ = encoder_config(store, m)
    rules += xblip_keys.encoder_rules(m, cfg)
    if isinstance(cfg, BeatsConfig):
      rules += _beats_tables(cfg, f"encoders.{m}.", xblip_keys.ENCODER_PREFIXES[m])
  items, missing = stream(store, rules, dtype=dtype, allow_missing=allow_missing)
  sd = dict(items)
  sd.update(buffers)
  write_torch(out, dict(sorted(sd.items())), wrap="model" if wrap else None)
  return missing


def _hf_config(qcfg, vcfg: EvaViTConfig, hf_text: dict, nq: int, image_token: int,
               dtype: str) -> dict:
  vision = dict(model_type="instructblip_vision_model", hidden_size=vcfg.width,
                intermediate_size=vcfg.mlp_dim, num_hidden_layers=vcfg.depth,
                num_attention_heads=vcfg.num_heads, image_size=vcfg.img_size,
                patch_size=vcfg.patch_size, hidden_act="gelu", layer_norm_eps=vcfg.layer_norm_eps,
                attention_dropout=0.0, qkv_bias=True, initializer_range=1e-10)
  qformer = dict(model_type="instructblip_qformer", vocab_size=qcfg.vocab_size,
                 hidden_size=qcfg.hidden_size, num_hidden_layers=qcfg.num_layers,
                 num_attention_heads=qcfg.num_heads, intermediate_size=qcfg.intermediate_size,
                 hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 max_position_embeddings=qcfg.max_position_embeddings,
                 layer_norm_eps=qcfg.layer_norm_eps,
                 cross_attention_frequency=qcfg.cross_attention_freq,
                 encoder_hidden_size=qcfg.encoder_width, pad_token_id=0, initializer_range=0.02)
  text = {**hf_text, "model_type": "llama"}
  text.pop("architectures", None)
  torch_dtype = {"keep": None, "float32": "float32", "bfloat16": "bfloat16",
                 "float16": "float16"}[dtype]
  out = dict(architectures=["InstructBlipForConditionalGeneration"], model_type="instructblip",
             vision_config=vision, qformer_config=qformer, text_config=text,
             num_query_tokens=nq, image_token_index=image_token,
             use_decoder_only_language_model=True, initializer_factor=1.0,
             initializer_range=0.02)
  if torch_dtype:
    out["dtype"] = torch_dtype
  return out


def hf_instructblip(store: ArrayStore, out: str, *, modality: str | None = None,
                    dtype: str = "keep", image_token_index: int | None = None,
                    max_shard_bytes: int = 5 * 10**9, allow_missing: bool = False,
                    qformer_heads: int | None = None) -> list[str]:
  """The bridge of one EVA-based modality (+ its ViT and the LLM) as an HF InstructBLIP folder.

  `image_token_index=None` appends an `<image>` row (the mean row) to the LLM's embedding and
  head and uses its id; an existing id can be given instead.
  """
  found = [m for m in bridges(store) if m in ("image", "video")
           and f"query_tokens.{m}" in store.shapes]
  m = modality or (found[0] if len(found) == 1 else None)
  if m is None or m not in found:
    raise CheckpointKeyError(f"choose --modality among the EVA-based bridges {found} "
                             f"(all bridges: {bridges(store)})")
  cfg = bridge_config(store, m, qformer_heads)
  vcfg, _ = encoder_config(store, m)
  lcfg, hf_text = llm_config(store)
  rules = (instructblip_keys.bridge_rules(cfg.qformer, m)
           + instructblip_keys.vision_rules(vcfg, m) + instructblip_keys.llm_rules(lcfg))
  post = {}
  if image_token_index is None:
    image_token_index = lcfg.vocab_size
    grow = lambda x: bert_keys.extra_rows(x, 1, "mean")
    post = {"language_model.model.embed_tokens.weight": grow,
            "language_model.lm_head.weight": grow}
    hf_text = {**hf_text, "vocab_size": lcfg.vocab_size + 1}
  elif not 0 <= image_token_index < lcfg.vocab_size:
    raise ValueError(f"--image-token-index {image_token_index} outside the vocabulary "
                     f"(0..{lcfg.vocab_size - 1})")
  other = lambda k: not k.startswith((f"ln.{m}.", f"qformer.{m}.", f"query_tokens.{m}",
                                      f"llm_proj.{m}.", f"encoders.{m}.", "llm."))
  items, missing = stream(store, rules, dtype=dtype, allow_missing=allow_missing, post=post,
                          extra_unused_ok=other)
  write_safetensors(out, shard_items(items, max_shard_bytes))
  config = _hf_config(cfg.qformer, vcfg, hf_text, cfg.num_query_tokens, image_token_index,
                      dtype)
  (Path(out) / "config.json").write_text(json.dumps(config, indent=2))
  return missing


def hf_llama(store: ArrayStore, out: str, *, dtype: str = "keep",
             max_shard_bytes: int = 5 * 10**9) -> list[str]:
  lcfg, hf = llm_config(store)
  items, missing = stream(store, prefixed(llama_keys.hf_rules(lcfg), "llm.", ""), dtype=dtype,
                          extra_unused_ok=lambda k: not k.startswith("llm."))
  write_safetensors(out, shard_items(items, max_shard_bytes))
  if dtype != "keep":
    hf = {**hf, "torch_dtype": dtype}
  (Path(out) / "config.json").write_text(json.dumps(hf, indent=2))
  return missing


def encoder(store: ArrayStore, out: str, *, modality: str, naming: str = "lavis",
            dtype: str = "keep") -> list[str]:
  """One frozen tower in its own release format (`.pth`/`.pt`)."""
  cfg, raw = encoder_config(store, modality)
  ours = f"encoders.{modality}."
  has_ln = f"ln.{modality}.scale" in store.shapes
  wrap, extra, key_prefix = None, None, ""
  if isinstance(cfg, EvaViTConfig):
    table = eva_vit_keys.lavis_rules if naming == "lavis" else eva_vit_keys.hf_rules
    rules = prefixed(table(cfg), ours, "")
    if has_ln:
      rules += layer_norm(f"ln.{modality}", "ln_vision" if naming == "lavis" else
                          "post_layernorm")
  elif isinstance(cfg, BeatsConfig):
    rules = prefixed(beats_keys.rules(cfg), ours, "") + _beats_tables(cfg, ours, "")
    wrap, extra = "model", {"cfg": raw["lavis_cfg"]}
  else:
    rules = prefixed(pointbert_keys.rules(cfg), ours, "")
    wrap, key_prefix = "state_dict", "module."  # the ULIP checkpoint layout
  mine = (ours, f"ln.{modality}.")
  items, missing = stream(store, rules, dtype=dtype,
                          extra_unused_ok=lambda k: not k.startswith(mine))
  sd = {key_prefix + k: v for k, v in items}
  write_torch(out, sd, wrap=wrap, extra=extra)
  return missing
