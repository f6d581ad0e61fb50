"""Architecture configs read off checkpoint shapes, where the file carries no config.

Only what parameter shapes determine is inferred (widths, depths, vocabulary, which layers have
cross-attention). Head counts leave no trace in the weights; they are options with the released
models' values as defaults and are recorded in the component's metadata.
"""

from __future__ import annotations

import re
from typing import Mapping

from xblip_jax.convert import qformer_keys
from xblip_jax.convert.mapping import CheckpointKeyError
from xblip_jax.models.encoders.eva_vit import EvaViTConfig
from xblip_jax.models.encoders.pointbert import PointBertConfig
from xblip_jax.models.qformer import QFormerConfig

Shapes = Mapping[str, tuple[int, ...]]


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
  if key not in shapes:
    raise CheckpointKeyError(f"cannot infer the {what}: no {key} in the checkpoint")
  return tuple(shapes[key])


def _indices(shapes: Shapes, pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def heads_for(width: int, preferred: int) -> int:
  """`preferred` if it divides `width`, else the largest divisor of `width` below it."""
  return next(h for h in range(min(preferred, width), 0, -1) if width % h == 0)


def hf_qformer_shapes(shapes: Shapes, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """`InstructBlipQFormerModel` shapes (under `prefix`) renamed to LAVIS `bert.*` names."""
  out = {}
  for k, v in shapes.items():
    if not k.startswith(prefix):
      continue
    rel = k[len(prefix):]
    lavis = "bert." + (rel.replace(".attention.attention.", ".attention.self.")
                       .replace("crossattention.attention.", "crossattention.self.")
                       .replace("embeddings.layernorm", "embeddings.LayerNorm"))
    if qformer_keys.lavis_to_hf_key(lavis) == rel:
      out[lavis] = tuple(v)
  return out


def qformer(shapes: Shapes, *, num_heads: int = 12, **overrides) -> QFormerConfig:
  """A Q-Former config from LAVIS-relative (`bert.*`) shapes."""
  layers = _indices(shapes, r"bert\.encoder\.layer\.(\d+)\.")
  if not layers:
    raise CheckpointKeyError("cannot infer the Q-Former: no bert.encoder.layer.* keys")
  n = layers[-1] + 1
  hidden = _need(shapes, "bert.encoder.layer.0.attention.self.query.weight", "Q-Former width")[0]
  inter = _need(shapes, "bert.encoder.layer.0.intermediate_query.dense.weight",
                "Q-Former FFN width")[0]
  cross = [i for i in range(n)
           if f"bert.encoder.layer.{i}.crossattention.self.key.weight" in shapes]
  if not cross or cross[0] != 0:
    raise CheckpointKeyError(f"cannot infer cross-attention: layers with it are {cross}")
  freq = cross[1] - cross[0] if len(cross) > 1 else n
  if cross != list(range(0, n, freq)):
    raise CheckpointKeyError(f"cross-attention in layers {cross} is not every k-th layer")
  width = shapes[f"bert.encoder.layer.{cross[0]}.crossattention.self.key.weight"][1]
  kw = dict(num_layers=n, hidden_size=hidden, intermediate_size=inter, encoder_width=width,
            cross_attention_freq=freq, num_heads=heads_for(hidden, num_heads),
            text_input="bert.embeddings.word_embeddings.weight" in shapes)
  if kw["text_input"]:
    kw["vocab_size"] = shapes["bert.embeddings.word_embeddings.weight"][0]
    kw["max_position_embeddings"] = _need(shapes, "bert.embeddings.position_embeddings.weight",
                                          "Q-Former position table")[0]
  kw.update(overrides)
  return QFormerConfig(**kw)


# EVA ViT names per naming scheme: class token, position table, patch conv, block regex, fc1.
EVA_NAMES = {
    "lavis": ("cls_token", "pos_embed", "patch_embed.proj.weight", r"blocks\.(\d+)\.",
              "blocks.0.mlp.fc1.weight"),
    "hf": ("embeddings.class_embedding", "embeddings.position_embedding",
           "embeddings.patch_embedding.weight", r"encoder\.layers\.(\d+)\.",
           "encoder.layers.0.mlp.fc1.weight"),
}


def eva_naming(keys) -> str:
  keys = set(keys)
  if "patch_embed.proj.weight" in keys:
    return "lavis"
  if "embeddings.patch_embedding.weight" in keys:
    return "hf"
  raise CheckpointKeyError("not an EVA ViT state dict: neither patch_embed.proj.weight (LAVIS) "
                           "nor embeddings.patch_embedding.weight (transformers) is present")


def eva_vit(shapes: Shapes, naming: str, *, img_size: int | None = None,
            depth: int | None = None, num_heads: int | None = None,
            layer_norm_eps: float = 1e-6) -> tuple[EvaViTConfig, int]:
  """(config, blocks in the file). `depth` defaults to the file's blocks, minus one for the
  40-block EVA-CLIP-g (BLIP-2 uses 39); `img_size` to the checkpoint's own grid."""
  cls, pos, patch, block_re, fc1 = EVA_NAMES[naming]
  width = _need(shapes, cls, "ViT width")[-1]
  kernel = _need(shapes, patch, "patch size")
  blocks = _indices(shapes, block_re)
  in_file = blocks[-1] + 1 if blocks else 0
  if depth is None:
    depth = in_file - 1 if (in_file == 40 and width == 1408) else in_file
  if depth > in_file:
    raise CheckpointKeyError(f"--depth {depth} but the checkpoint has {in_file} blocks")
  tokens = _need(shapes, pos, "position table")[-2]
  grid = int(round((tokens - 1) ** 0.5))
  mlp = _need(shapes, fc1, "MLP width")[0]
  ratio = mlp / width
  if int(width * ratio) != mlp:
    ratio = (mlp + 0.5) / width  # int() truncation must land on the stored width
  heads = num_heads or (16 if width == 1408 else heads_for(width, max(1, width // 64)))
  cfg = EvaViTConfig(img_size=img_size or grid * kernel[-1], patch_size=kernel[-1], width=width,
                     depth=depth, num_heads=heads, mlp_ratio=ratio, in_chans=kernel[1],
                     layer_norm_eps=layer_norm_eps)
  return cfg, in_file


def pointbert(shapes: Shapes, *, num_heads: int = 6, group_size: int = 32,
              num_group: int = 512, npoints: int = 8192) -> PointBertConfig:
  """A PointBERT config from ULIP names (`point_encoder.*`, `pc_projection`)."""
  p = "point_encoder."
  trans = _need(shapes, p + "cls_token", "trans_dim")[-1]
  depth = len(_indices(shapes, r"point_encoder\.blocks\.blocks\.(\d+)\."))
  proj = _need(shapes, "pc_projection", "projection")
  first0 = _need(shapes, p + "encoder.first_conv.0.weight", "encoder")[0]
  first3 = _need(shapes, p + "encoder.first_conv.3.weight", "encoder")[0]
  second0 = _need(shapes, p + "encoder.second_conv.0.weight", "encoder")[0]
  enc = _need(shapes, p + "encoder.second_conv.3.weight", "encoder_dims")[0]
  fc1 = _need(shapes, p + "blocks.blocks.0.mlp.fc1.weight", "MLP width")[0]
  return PointBertConfig(
      trans_dim=trans, depth=depth, num_heads=heads_for(trans, num_heads),
      mlp_ratio=fc1 / trans, qkv_bias=p + "blocks.blocks.0.attn.qkv.bias" in shapes,
      group_size=group_size, num_group=num_group, npoints=npoints, encoder_dims=enc,
      pc_feat_dim=proj[0], embed_dim=proj[1], first_conv_dims=(first0, first3),
      second_conv_hidden=second0,
      pos_hidden=_need(shapes, p + "pos_embed.0.weight", "position MLP")[0])


def bridge_from_ours(shapes: Shapes, m: str, *, num_heads: int = 12
                     ) -> tuple[QFormerConfig, int, int, int]:
  """(Q-Former config, encoder width, query tokens, LLM width) of bridge `m` from our paths."""
  q = f"qformer.{m}."
  layers = _indices(shapes, re.escape(q) + r"layers\.(\d+)\.")
  if not layers:
    raise CheckpointKeyError(f"no {q}layers.* in the checkpoint(s)")
  n = layers[-1] + 1
  nq, hidden = _need(shapes, f"query_tokens.{m}", "query tokens")[1:]
  cross = [i for i in range(n) if f"{q}layers.{i}.cross_attention.key.kernel" in shapes]
  if not cross or cross != list(range(0, n, (cross[1] - cross[0]) if len(cross) > 1 else n)):
    raise CheckpointKeyError(f"cross-attention in layers {cross} is not every k-th layer")
  kw = dict(num_layers=n, hidden_size=hidden, num_heads=heads_for(hidden, num_heads),
            intermediate_size=_need(shapes, f"{q}layers.0.query_ffn.intermediate.kernel",
                                    "FFN width")[1],
            encoder_width=shapes[f"{q}layers.0.cross_attention.key.kernel"][0],
            cross_attention_freq=(cross[1] - cross[0]) if len(cross) > 1 else n,
            num_query_tokens=nq,
            text_input=f"{q}embeddings.word_embeddings.embedding" in shapes)
  if kw["text_input"]:
    kw["vocab_size"] = shapes[f"{q}embeddings.word_embeddings.embedding"][0]
    kw["max_position_embeddings"] = shapes[f"{q}embeddings.position_embeddings.embedding"][0]
  width = _need(shapes, f"ln.{m}.scale", "modality LayerNorm")[0]
  llm_hidden = _need(shapes, f"llm_proj.{m}.kernel", "LLM projection")[1]
  return QFormerConfig(**kw), width, nq, llm_hidden
