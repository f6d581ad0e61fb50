"""Import plans: which file, which key table, which abstract targets, for each source kind.

Each function returns `engine.Plan`s (one per output component) built from the existing key
tables; `engine.run` converts them and `orbax_io.save_component` writes each one. Targets are the
real modules built abstractly (`nnx.eval_shape`), so shapes come from the model code itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import jax
from flax import nnx

from xblip_jax.convert import (beats_keys, bert_keys, eva_vit_keys, infer, instructblip_keys,
                               llama_keys, pointbert_keys, xblip_keys)
from xblip_jax.convert.engine import Plan, View
from xblip_jax.convert.io import (CheckpointFileError, Source, TorchSource, open_source,
                                  select_state_dict, torch_load)
from xblip_jax.convert.mapping import CheckpointKeyError, flat_params, layer_norm, prefixed
from xblip_jax.models.encoders.beats import Beats, BeatsConfig
from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig
from xblip_jax.models.encoders.pointbert import PointBert
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import Llama, LlamaConfig
from xblip_jax.models.qformer import QFormer, QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip

_F32 = Precision.float32()

# transformers' defaults for fields a config.json may leave out (transformers 5.23 values).
HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                          num_attention_heads=16, image_size=224, patch_size=14,
                          layer_norm_eps=1e-6)
HF_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072,
                           max_position_embeddings=512, layer_norm_eps=1e-12,
                           cross_attention_frequency=2, encoder_hidden_size=1408)
HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                         max_position_embeddings=2048, tie_word_embeddings=False)


def _abstract(build: Callable[[], nnx.Module], prefix: str) -> dict[str, jax.ShapeDtypeStruct]:
  model = nnx.eval_shape(build)
  return {prefix + k: v.get_value() for k, v in flat_params(model).items()}


def _json(path: Path) -> dict:
  if not path.is_file():
    raise CheckpointFileError(f"{path}: file not found")
  return json.loads(path.read_text())


def _meta(kind: str, roots: Sequence[str], source: dict, config: dict,
          modality: str | None = None) -> dict:
  return {"kind": kind, "modality": modality, "roots": list(roots), "source": source,
          "config": config}


def _bridge_targets(qcfg: QFormerConfig, modality: str, width: int, llm_hidden: int,
                    num_query_tokens: int) -> tuple[dict, XBlipConfig]:
  """Abstract bridge variables (ln, qformer, query_tokens, llm_proj) of one modality."""
  llm = LlamaConfig.tiny(hidden_size=llm_hidden, num_heads=1, num_kv_heads=1,
                         intermediate_size=1, num_layers=1, vocab_size=1)
  cfg = XBlipConfig(encoder_widths=((modality, width),), qformer=qcfg, llm=llm,
                    num_query_tokens=num_query_tokens)
  targets = _abstract(lambda: XInstructBlip(cfg, rngs=nnx.Rngs(0)), "")
  return {k: v for k, v in targets.items() if not k.startswith("llm.")}, cfg


def _bridge_roots(m: str) -> list[str]:
  return [f"ln.{m}", f"qformer.{m}", f"query_tokens.{m}", f"llm_proj.{m}"]


def _shapes(views: Sequence[View]) -> dict[str, tuple[int, ...]]:
  """Canonical key -> shape over all views (earlier views win)."""
  out: dict[str, tuple[int, ...]] = {}
  for view in reversed(views):
    for k in view.owned():
      out[view.canonical(k)] = view.source.shape(k)
  return out


def lavis_qformer(path: str, *, modality: str, source_modality: str | None = None,
                  skip_attention: bool = False, stage1: str | None = None,
                  num_heads: int = 12, llm_hidden: int | None = None,
                  trust_pickle: bool = False) -> list[Plan]:
  """A LAVIS X-InstructBLIP per-modality checkpoint -> the bridge of `modality`.

  `source_modality` is the prefix in the file (default `modality`; "stage1" reads BLIP-2
  stage-1 names `Qformer.*`, `query_tokens`, `ln_vision.*`). Tensors absent from the file are
  taken from `stage1` when given (LAVIS issue #344). `skip_attention` leaves every key containing
  "attention" unloaded, as LAVIS' `load_attention=False`.
  """
  m = modality
  parts = ("_Qformer.", "_query_tokens", "_ln.", "_llm_proj.")
  stage1_names = ("Qformer.", "query_tokens", "ln_vision.")
  if source_modality == "stage1":
    renames = tuple((m + p, a) for p, a in zip(parts, stage1_names))
  else:
    s = source_modality or m
    renames = tuple((m + p, s + p) for p in parts)
  src = open_source(path, trust_pickle=trust_pickle)
  if not any(k.startswith(renames[0][1]) for k in src.keys()):
    found = sorted({k.split("Qformer.")[0] or "(none: stage-1 names)" for k in src.keys()
                    if "Qformer." in k})
    raise CheckpointKeyError(f"{path}: no {renames[0][1]}* keys; Q-Former prefixes in the file: "
                             f"{found or 'none'} (choose with --source-modality)")
  views = [View(src, renames, label=path)]
  if stage1:
    views.append(View(open_source(stage1, trust_pickle=trust_pickle),
                      tuple((m + p, a) for p, a in zip(parts, stage1_names)),
                      label=f"--stage1 {stage1}"))
  shapes = _shapes(views)
  qshapes = {k[len(m + "_Qformer."):]: v for k, v in shapes.items()
             if k.startswith(m + "_Qformer.")}
  qcfg = infer.qformer(qshapes, num_heads=num_heads)
  nq_shape = shapes.get(f"{m}_query_tokens")
  if nq_shape is None:
    raise CheckpointKeyError(f"no {renames[1][1]} in {path}" + (" or --stage1" if stage1 else ""))
  width = shapes.get(f"{m}_ln.weight", (qcfg.encoder_width,))[0]
  hidden = shapes.get(f"{m}_llm_proj.weight", (llm_hidden or 4096,))[0]
  targets, cfg = _bridge_targets(qcfg, m, width, hidden, nq_shape[1])
  plan = Plan(f"bridge-{m}", xblip_keys.bridge_rules(cfg), targets, views,
              ignore=xblip_keys.ignore_patterns(cfg),
              skip=(lambda k: "attention" in k) if skip_attention else None)
  plan.meta = _meta("bridge", _bridge_roots(m), {"kind": "lavis-qformer", "file": path,
                                                 "stage1": stage1, "source_modality":
                                                 source_modality or m,
                                                 "skip_attention": skip_attention},
                    {"qformer": dataclasses.asdict(qcfg), "encoder_width": width,
                     "num_query_tokens": nq_shape[1], "llm_hidden": hidden,
                     "assumed": ["qformer.num_heads"]}, m)
  return [plan]


def _llama_config(hf: dict) -> LlamaConfig:
  return LlamaConfig.from_hf({**HF_LLAMA_DEFAULTS, **hf})


def hf_llama(folder: str, *, add_pad_row: bool = False, row_init: str = "mean",
             trust_pickle: bool = False) -> list[Plan]:
  """An HF LLaMA/Vicuna folder (config.json + safetensors or .bin, sharded or not) -> `llm`."""
  hf = _json(Path(folder) / "config.json")
  lcfg = _llama_config(hf)
  src = open_source(folder, trust_pickle=trust_pickle)
  rules = prefixed(llama_keys.hf_rules(lcfg), "llm.", "")
  notes = []
  if add_pad_row:
    rules = [bert_keys.grow_rows(r, 1, row_init, axis=1 if r.ours[0].endswith("kernel") else 0)
             if r.ours[0] in ("llm.embed_tokens.embedding", "llm.lm_head.kernel") else r
             for r in rules]
    lcfg = dataclasses.replace(lcfg, vocab_size=lcfg.vocab_size + 1)
    hf = {**hf, "vocab_size": lcfg.vocab_size}
    notes.append(f"[PAD] row {lcfg.vocab_size - 1} appended to embed_tokens and lm_head "
                 f"({row_init} of the existing rows)")
  targets = _abstract(lambda: Llama(lcfg, precision=_F32, rngs=nnx.Rngs(0)), "llm.")
  plan = Plan("llm", rules, targets, [View(src, label=folder)],
              ignore=llama_keys.ignore_patterns(lcfg), notes=notes)
  plan.meta = _meta("llm", ["llm"], {"kind": "hf-llama", "folder": folder,
                                     "add_pad_row": add_pad_row},
                    {"llm": dataclasses.asdict(lcfg), "hf_config": hf})
  return [plan]


def _find_prefix(src: Source, probes: Sequence[str], candidates: Sequence[str]) -> str:
  for p in candidates:
    if any(p + probe in src for probe in probes):
      return p
  raise CheckpointKeyError(f"{src.description}: none of {list(probes)} found under the "
                           f"prefixes {list(candidates)}")


def _blocks_beyond(depth: int, block: str) -> str:
  keep = "|".join(str(i) for i in range(depth)) or "-1"
  return rf"{block}\.(?!({keep})\.)\d+\..*"


def eva_vit(path: str, *, modality: str = "image", img_size: int | None = None,
            depth: int | None = None, num_heads: int | None = None, with_ln: bool = False,
            trust_pickle: bool = False) -> list[Plan]:
  """LAVIS `eva_vit_g.pth` (or `Blip2VisionModel` / `InstructBlipVisionModel` weights) -> the
  frozen encoder `encoders.{modality}`; blocks beyond `depth` are dropped (EVA-CLIP-g: 39 of 40),
  the position table resampled for another `img_size`. With `with_ln`, LAVIS `ln_vision` / HF
  `post_layernorm` becomes the bridge LayerNorm `ln.{modality}`."""
  m = modality
  src = open_source(path, trust_pickle=trust_pickle)
  p = _find_prefix(src, ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
                   ("", "visual_encoder.", f"{m}_encoder.", "vision_model."))
  rel = {k[len(p):]: src.shape(k) for k in src.keys() if k.startswith(p)}
  naming = infer.eva_naming(rel)
  cfg, in_file = infer.eva_vit(rel, naming, img_size=img_size, depth=depth, num_heads=num_heads)
  table = eva_vit_keys.lavis_rules if naming == "lavis" else eva_vit_keys.hf_rules
  rules = prefixed(table(cfg), f"encoders.{m}.", "")
  ln_src = ("ln_vision." if p in ("", "visual_encoder.") else None) if naming == "lavis" else (
      p + "post_layernorm.")
  ignore = [_blocks_beyond(cfg.depth, r"blocks" if naming == "lavis" else r"encoder\.layers")]
  renames: tuple = (("", p),)
  targets = _abstract(lambda: EvaViT(cfg, precision=_F32, rngs=nnx.Rngs(0)), f"encoders.{m}.")
  if ln_src and any(k.startswith(ln_src) for k in src.keys()):
    renames = (("ln.", ln_src),) + renames
    if with_ln:
      rules += layer_norm(f"ln.{m}", "ln")
      targets.update({f"ln.{m}.{n}": jax.ShapeDtypeStruct((cfg.width,), "float32")
                      for n in ("scale", "bias")})
    else:
      ignore.append(r"ln\..*")
  notes = []
  grid = int(round((rel[infer.EVA_NAMES[naming][1]][-2] - 1) ** 0.5))
  if grid != cfg.grid:
    notes.append(f"position table resampled from a {grid}x{grid} to a {cfg.grid}x{cfg.grid} grid")
  if in_file > cfg.depth:
    notes.append(f"blocks {cfg.depth}..{in_file - 1} of the file dropped (depth {cfg.depth})")
  plan = Plan(f"encoder-{m}", rules, targets, [View(src, renames, label=path)],
              ignore=ignore, notes=notes)
  roots = [f"encoders.{m}"] + ([f"ln.{m}"] if with_ln else [])
  plan.meta = _meta("encoder", roots, {"kind": "eva-vit", "file": path, "naming": naming},
                    {"eva_vit": dataclasses.asdict(cfg), "assumed": ["num_heads"]}, m)
  return [plan]


def beats(path: str, *, modality: str = "audio", trust_pickle: bool = False) -> list[Plan]:
  """A BEATs `.pt` (`cfg` + `model`) -> `encoders.{modality}`; tied relative tables checked."""
  obj = torch_load(path, trust_pickle=trust_pickle)
  if not isinstance(obj, dict) or "cfg" not in obj:
    raise CheckpointFileError(f"{path}: a BEATs checkpoint holds 'cfg' and 'model'; found "
                              f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
  cfg = BeatsConfig.from_lavis(obj["cfg"])
  src = TorchSource([select_state_dict(obj, path, "model")], path)
  tables = {k: src.read(k) for k in src.keys() if k.endswith("relative_attention_bias.weight")}
  beats_keys.check_shared_bias(cfg, tables)
  rules = prefixed(beats_keys.rules(cfg), f"encoders.{modality}.", "")
  targets = _abstract(lambda: Beats(cfg, precision=_F32, rngs=nnx.Rngs(0)),
                      f"encoders.{modality}.")
  plan = Plan(f"encoder-{modality}", rules, targets, [View(src, label=path)],
              ignore=beats_keys.IGNORE)
  plan.meta = _meta("encoder", [f"encoders.{modality}"], {"kind": "beats", "file": path},
                    {"beats": dataclasses.asdict(cfg), "lavis_cfg": obj["cfg"]}, modality)
  return [plan]


def pointbert(path: str, *, modality: str = "pc", num_heads: int = 6, group_size: int = 32,
              num_group: int = 512, npoints: int = 8192, trust_pickle: bool = False
              ) -> list[Plan]:
  """A ULIP(-2) PointBERT `.pt` (`module.` stripped) -> `encoders.{modality}`. Keys outside
  `point_encoder.*` / `pc_projection` (other ULIP towers) are not read."""
  obj = torch_load(path, trust_pickle=trust_pickle)
  sd = select_state_dict(obj, path)
  strip = "module." if sd and all(k.startswith("module.") for k in sd) else ""
  src = TorchSource([sd], path, strip_prefix=strip)
  p = _find_prefix(src, ("point_encoder.cls_token",), ("", "pc_encoder."))
  renames = (("point_encoder.", p + "point_encoder."), ("pc_projection", p + "pc_projection"))
  view = View(src, renames, label=path)
  cfg = infer.pointbert(_shapes([view]), num_heads=num_heads, group_size=group_size,
                        num_group=num_group, npoints=npoints)
  rules = prefixed(pointbert_keys.rules(cfg), f"encoders.{modality}.", "")
  targets = _abstract(lambda: PointBert(cfg, precision=_F32, rngs=nnx.Rngs(0)),
                      f"encoders.{modality}.")
  plan = Plan(f"encoder-{modality}", rules, targets, [view], ignore=pointbert_keys.IGNORE)
  plan.meta = _meta("encoder", [f"encoders.{modality}"], {"kind": "pointbert", "file": path},
                    {"pointbert": dataclasses.asdict(cfg),
                     "assumed": ["num_heads", "group_size", "num_group", "npoints"]}, modality)
  return [plan]


def bert_base(folder: str, *, modality: str, encoder_width: int,
              cross_attention_freq: int = 2, vocab_size: int | None = None,
              row_init: str = "mean") -> list[Plan]:
  """HF BERT weights -> the Q-Former `qformer.{modality}` as BLIP-2 initialises it."""
  hf = _json(Path(folder) / "config.json")
  src = open_source(folder)
  bert_vocab = hf["vocab_size"]
  qcfg = QFormerConfig(vocab_size=vocab_size or bert_vocab + 1, hidden_size=hf["hidden_size"],
                       num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                       intermediate_size=hf["intermediate_size"],
                       max_position_embeddings=hf["max_position_embeddings"],
                       layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                       encoder_width=encoder_width, cross_attention_freq=cross_attention_freq)
  renames = (("", ""),) if "bert.embeddings.word_embeddings.weight" in src else (("bert.", ""),)
  rules = prefixed(bert_keys.rules(qcfg, bert_vocab, row_init=row_init), f"qformer.{modality}.",
                   "")
  targets = _abstract(lambda: QFormer(qcfg, precision=_F32, rngs=nnx.Rngs(0)),
                      f"qformer.{modality}.")
  notes = ["cross-attention is not in BERT: it stays at the model's initialisation (BLIP-2)",
           "query FFNs are copies of each layer's text FFN (BLIP-2)"]
  if qcfg.vocab_size > bert_vocab:
    notes.append(f"{qcfg.vocab_size - bert_vocab} word-embedding row(s) appended ({row_init})")
  plan = Plan(f"qformer-{modality}", rules, targets, [View(src, renames, label=folder)],
              ignore=bert_keys.IGNORE, notes=notes)
  plan.meta = _meta("qformer-init", [f"qformer.{modality}"], {"kind": "bert-base",
                                                              "folder": folder},
                    {"qformer": dataclasses.asdict(qcfg)}, modality)
  return [plan]


def hf_instructblip(folder: str, *, modality: str = "image",
                    parts: Sequence[str] = ("bridge", "vision", "llm"),
                    trust_pickle: bool = False) -> list[Plan]:
  """An HF `InstructBlipForConditionalGeneration` folder -> bridge, vision and llm components."""
  cfg = _json(Path(folder) / "config.json")
  vc = {**HF_VISION_DEFAULTS, **cfg.get("vision_config", {})}
  qc = {**HF_QFORMER_DEFAULTS, **cfg.get("qformer_config", {})}
  tc = cfg.get("text_config", {})
  if tc.get("model_type", "llama") != "llama":
    raise CheckpointFileError(f"{folder}: the language model is {tc.get('model_type')}, "
                              "not LLaMA")
  src = open_source(folder, trust_pickle=trust_pickle)
  m, plans = modality, []
  source = {"kind": "hf-instructblip", "folder": folder}
  vcfg = EvaViTConfig(img_size=vc["image_size"], patch_size=vc["patch_size"],
                      width=vc["hidden_size"], depth=vc["num_hidden_layers"],
                      num_heads=vc["num_attention_heads"],
                      mlp_ratio=(vc["intermediate_size"] + 0.5) / vc["hidden_size"],
                      layer_norm_eps=vc["layer_norm_eps"])
  if "bridge" in parts:
    qcfg = QFormerConfig(vocab_size=qc["vocab_size"], hidden_size=qc["hidden_size"],
                         num_layers=qc["num_hidden_layers"], num_heads=qc["num_attention_heads"],
                         intermediate_size=qc["intermediate_size"],
                         max_position_embeddings=qc["max_position_embeddings"],
                         layer_norm_eps=qc["layer_norm_eps"],
                         encoder_width=qc["encoder_hidden_size"],
                         cross_attention_freq=qc["cross_attention_frequency"])
    nq = cfg.get("num_query_tokens", 32)
    llm_hidden = tc.get("hidden_size", HF_LLAMA_DEFAULTS["hidden_size"])
    targets, _ = _bridge_targets(qcfg, m, vcfg.width, llm_hidden, nq)
    view = View(src, tuple((p, p) for p in instructblip_keys.BRIDGE_PREFIXES), label=folder)
    plan = Plan(f"bridge-{m}", instructblip_keys.bridge_rules(qcfg, m), targets, [view],
                ignore=instructblip_keys.BRIDGE_IGNORE)
    plan.meta = _meta("bridge", _bridge_roots(m), source, {
        "qformer": dataclasses.asdict(qcfg), "encoder_width": vcfg.width, "num_query_tokens": nq,
        "llm_hidden": llm_hidden, "modality_ln_eps": vc["layer_norm_eps"]}, m)
    plans.append(plan)
  if "vision" in parts:
    view = View(src, ((instructblip_keys.VISION_PREFIX,) * 2,),
                exclude=("vision_model.post_layernorm.",), label=folder)
    targets = _abstract(lambda: EvaViT(vcfg, precision=_F32, rngs=nnx.Rngs(0)), f"encoders.{m}.")
    plan = Plan(f"encoder-{m}", instructblip_keys.vision_rules(vcfg, m), targets, [view])
    plan.meta = _meta("encoder", [f"encoders.{m}"], source,
                      {"eva_vit": dataclasses.asdict(vcfg)}, m)
    plans.append(plan)
  if "llm" in parts:
    lcfg = _llama_config(tc)
    view = View(src, ((instructblip_keys.LLM_PREFIX,) * 2,), label=folder)
    targets = _abstract(lambda: Llama(lcfg, precision=_F32, rngs=nnx.Rngs(0)), "llm.")
    ignore = tuple(f"language_model\\.{p}" for p in llama_keys.ignore_patterns(lcfg))
    plan = Plan("llm", instructblip_keys.llm_rules(lcfg), targets, [view], ignore=ignore)
    plan.meta = _meta("llm", ["llm"], source, {"llm": dataclasses.asdict(lcfg),
                                               "hf_config": {**HF_LLAMA_DEFAULTS, **tc}})
    plans.append(plan)
  if not plans:
    raise ValueError(f"--parts {list(parts)}: choose from bridge, vision, llm")
  return plans
