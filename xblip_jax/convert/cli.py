"""`python -m xblip_jax.convert`: PyTorch checkpoints <-> xblip_jax Orbax components.

  import <kind> SOURCE --out DIR      one Orbax checkpoint per component (docs/convert.md)
  export <format> --from DIR ... --out PATH

Every conversion prints what it converted and lists missing, unexpected and mis-shaped keys by
name; it writes nothing when the result would be partial, unless --allow-missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from xblip_jax.convert import engine, exporters, importers
from xblip_jax.convert.io import CheckpointFileError, parse_size
from xblip_jax.convert.mapping import CheckpointKeyError
from xblip_jax.convert.orbax_io import ArrayStore, save_component

IMPORTS = ("lavis-qformer", "hf-llama", "eva-vit", "beats", "pointbert", "bert-base",
           "hf-instructblip")
EXPORTS = ("lavis", "hf-instructblip", "hf-llama", "eva-vit", "beats", "pointbert")


def _common_import(p: argparse.ArgumentParser) -> None:
  p.add_argument("source", help="checkpoint file or HF-style folder")
  p.add_argument("--out", required=True, help="output component directory (Orbax)")
  p.add_argument("--dtype", default="keep", choices=sorted(engine.DTYPE_POLICIES),
                 help="dtype of the stored floating tensors (keep = as in the source)")
  p.add_argument("--allow-missing", action="store_true",
                 help="write even if source tensors are missing (they are listed)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--trust-pickle", action="store_true",
                 help="torch.load with weights_only=False (only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m xblip_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  top = parser.add_subparsers(dest="command", required=True)
  imp = top.add_parser("import", help="PyTorch checkpoint -> Orbax component(s)")
  kinds = imp.add_subparsers(dest="kind", required=True)

  p = kinds.add_parser("lavis-qformer", help="X-InstructBLIP per-modality Q-Former file")
  _common_import(p)
  p.add_argument("--modality", required=True, help="our bridge: image, video, audio, pc")
  p.add_argument("--source-modality", help="prefix in the file (default --modality; 'stage1' "
                 "for BLIP-2 stage-1 names Qformer.*/query_tokens/ln_vision.*)")
  p.add_argument("--skip-attention", action="store_true",
                 help="do not load keys containing 'attention' (LAVIS load_attention=False)")
  p.add_argument("--stage1", help="BLIP-2 stage-1 checkpoint filling tensors the file lacks")
  p.add_argument("--num-heads", type=int, default=12, help="Q-Former heads (not in the file)")
  p.add_argument("--llm-hidden", type=int, help="LLM width when the file has no llm_proj")

  p = kinds.add_parser("hf-llama", help="HF LLaMA/Vicuna folder")
  _common_import(p)
  p.add_argument("--add-pad-row", action="store_true",
                 help="append X-InstructBLIP's [PAD] token row to embed_tokens and lm_head")
  p.add_argument("--row-init", default="mean", choices=("mean", "zeros"))

  p = kinds.add_parser("eva-vit", help="LAVIS eva_vit_g.pth or Blip2VisionModel weights")
  _common_import(p)
  p.add_argument("--modality", default="image", choices=("image", "video"))
  p.add_argument("--img-size", type=int, help="resample the position table for this size")
  p.add_argument("--depth", type=int, help="blocks kept (default: 39 of EVA-CLIP-g's 40)")
  p.add_argument("--num-heads", type=int, help="attention heads (default 16 for ViT-g)")
  p.add_argument("--with-ln", action="store_true",
                 help="also import ln_vision/post_layernorm as the bridge LayerNorm")

  p = kinds.add_parser("beats", help="BEATs .pt with cfg + model")
  _common_import(p)
  p.add_argument("--modality", default="audio")

  p = kinds.add_parser("pointbert", help="ULIP(-2) PointBERT .pt")
  _common_import(p)
  p.add_argument("--modality", default="pc")
  for name, default in (("num-heads", 6), ("group-size", 32), ("num-group", 512),
                        ("npoints", 8192)):
    p.add_argument(f"--{name}", type=int, default=default)

  p = kinds.add_parser("bert-base", help="HF BERT folder -> Q-Former initialisation")
  _common_import(p)
  p.add_argument("--modality", required=True)
  p.add_argument("--encoder-width", type=int, required=True,
                 help="cross-attention key/value width (1408 image, 768 audio, 512 pc)")
  p.add_argument("--cross-attention-freq", type=int, default=2)
  p.add_argument("--vocab-size", type=int, help="default: BERT's + 1 ([DEC], as BLIP-2)")
  p.add_argument("--row-init", default="mean", choices=("mean", "zeros"))

  p = kinds.add_parser("hf-instructblip", help="HF InstructBLIP folder (3 components)")
  _common_import(p)
  p.add_argument("--modality", default="image", choices=("image", "video"))
  p.add_argument("--parts", default="bridge,vision,llm")

  exp = top.add_parser("export", help="Orbax component(s) / trainer checkpoint -> PyTorch")
  formats = exp.add_subparsers(dest="format", required=True)
  for fmt in EXPORTS:
    p = formats.add_parser(fmt)
    p.add_argument("--from", dest="components", action="append", default=[],
                   help="component directory (repeatable)")
    p.add_argument("--trainer", help="trainer workdir/checkpoints/step directory (trainable "
                   "state)")
    p.add_argument("--step", type=int, help="trainer step (default: latest)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="keep", choices=sorted(engine.DTYPE_POLICIES))
    if fmt in ("lavis", "hf-instructblip"):
      p.add_argument("--allow-missing", action="store_true")
      p.add_argument("--qformer-heads", type=int, help="Q-Former heads if not recorded")
    if fmt == "lavis":
      p.add_argument("--no-wrap", action="store_true", help="save the bare state dict")
    if fmt in ("hf-instructblip", "hf-llama"):
      p.add_argument("--max-shard-size", default="5GB")
    if fmt == "hf-instructblip":
      p.add_argument("--modality", choices=("image", "video"))
      p.add_argument("--image-token-index", type=int,
                     help="existing <image> id (default: append a row and use it)")
    if fmt in ("eva-vit", "beats", "pointbert"):
      p.add_argument("--modality", required=fmt == "eva-vit",
                     default={"beats": "audio", "pointbert": "pc"}.get(fmt))
    if fmt == "eva-vit":
      p.add_argument("--naming", default="lavis", choices=("lavis", "hf"))
  return parser


def _plans(a: argparse.Namespace):
  tp = a.trust_pickle
  if a.kind == "lavis-qformer":
    return importers.lavis_qformer(a.source, modality=a.modality,
                                   source_modality=a.source_modality,
                                   skip_attention=a.skip_attention, stage1=a.stage1,
                                   num_heads=a.num_heads, llm_hidden=a.llm_hidden,
                                   trust_pickle=tp)
  if a.kind == "hf-llama":
    return importers.hf_llama(a.source, add_pad_row=a.add_pad_row, row_init=a.row_init,
                              trust_pickle=tp)
  if a.kind == "eva-vit":
    return importers.eva_vit(a.source, modality=a.modality, img_size=a.img_size, depth=a.depth,
                             num_heads=a.num_heads, with_ln=a.with_ln, trust_pickle=tp)
  if a.kind == "beats":
    return importers.beats(a.source, modality=a.modality, trust_pickle=tp)
  if a.kind == "pointbert":
    return importers.pointbert(a.source, modality=a.modality, num_heads=a.num_heads,
                               group_size=a.group_size, num_group=a.num_group,
                               npoints=a.npoints, trust_pickle=tp)
  if a.kind == "bert-base":
    return importers.bert_base(a.source, modality=a.modality, encoder_width=a.encoder_width,
                               cross_attention_freq=a.cross_attention_freq,
                               vocab_size=a.vocab_size, row_init=a.row_init)
  return importers.hf_instructblip(a.source, modality=a.modality,
                                   parts=tuple(a.parts.split(",")), trust_pickle=tp)


def _import(a: argparse.Namespace, log) -> list[Path]:
  plans = _plans(a)
  results = engine.run(plans, dtype=a.dtype, allow_missing=a.allow_missing, log=log)
  written = []
  for plan, (arrays, report) in zip(plans, results):
    out = Path(a.out) if len(plans) == 1 else Path(a.out) / plan.name
    meta = dict(plan.meta, dtype_policy=a.dtype, report=report.to_json())
    save_component(out, arrays, meta, overwrite=a.overwrite)
    size = sum(x.nbytes for x in arrays.values())
    log(f"wrote {out} ({len(arrays)} arrays, {size / 2**20:.1f} MiB)")
    written.append(out)
  return written


def _export(a: argparse.Namespace, log) -> list[str]:
  store = ArrayStore()
  for d in a.components:
    store.add_component(d)
  if a.trainer:
    log(f"trainer checkpoint {store.add_trainer(a.trainer, a.step)}")
  if not store.shapes:
    raise CheckpointKeyError("nothing to export: give --from DIR and/or --trainer DIR")
  if a.format == "lavis":
    missing = exporters.lavis(store, a.out, dtype=a.dtype, wrap=not a.no_wrap,
                              allow_missing=a.allow_missing, qformer_heads=a.qformer_heads)
  elif a.format == "hf-instructblip":
    missing = exporters.hf_instructblip(
        store, a.out, modality=a.modality, dtype=a.dtype, image_token_index=a.image_token_index,
        max_shard_bytes=parse_size(a.max_shard_size), allow_missing=a.allow_missing,
        qformer_heads=a.qformer_heads)
  elif a.format == "hf-llama":
    missing = exporters.hf_llama(store, a.out, dtype=a.dtype,
                                 max_shard_bytes=parse_size(a.max_shard_size))
  else:
    missing = exporters.encoder(store, a.out, modality=a.modality,
                                naming=getattr(a, "naming", "lavis"), dtype=a.dtype)
  if missing:
    log(f"--allow-missing: {len(missing)} parameter(s) not exported:\n"
        + "\n".join(f"  {k}" for k in missing))
  log(f"wrote {a.out}")
  return missing


def run(argv: Sequence[str], log=print):
  """Parses `argv` and converts; errors propagate (`CheckpointKeyError`, ...)."""
  a = build_parser().parse_args(list(argv))
  t0 = time.perf_counter()
  result = _import(a, log) if a.command == "import" else _export(a, log)
  log(f"done in {time.perf_counter() - t0:.1f} s")
  return result


def main(argv: Sequence[str] | None = None) -> int:
  try:
    run(sys.argv[1:] if argv is None else argv)
  except (CheckpointKeyError, CheckpointFileError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
