"""BEATs checkpoint keys (`checkpoint['model']` of a BEATs .pt) <-> `models.encoders.beats.Beats`.

In X-InstructBLIP's state dict the same keys sit under `audio_encoder.model.` (`PREFIX`); the
`audio_ln.*` LayerNorm beside them belongs to the bridge, not to this table.

The relative position table is one tensor that the reference ties across layers; a state dict
lists it under every layer. Layer 0's key loads it, the others are ignored on load
(`IGNORE`) after `check_shared_bias` has made sure they hold the same values, and `export`
writes them all back so that a strict torch load sees every key.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx

from xblip_jax.convert.mapping import (CheckpointKeyError, LoadReport, Rule, conv,
                                       export_state_dict, flat_params, layer_norm, linear,
                                       load_state_dict, rule)
from xblip_jax.models.encoders.beats import Beats, BeatsConfig
from xblip_jax.models.layers import Precision

PREFIX = "audio_encoder.model."
# Tied copies of layer 0's table (checked by `check_shared_bias`, not loaded).
IGNORE = (r"encoder\.layers\.([1-9]\d*)\.self_attn\.relative_attention_bias\.weight",)
_TABLE = "encoder.layers.{i}.self_attn.relative_attention_bias.weight"


def _weight_g_to_ours(g: np.ndarray) -> tuple[np.ndarray, ...]:
  return (np.ascontiguousarray(g.reshape(-1)),)  # (1, 1, K) -> (K,)


def _weight_g_to_theirs(g: np.ndarray) -> tuple[np.ndarray, ...]:
  return (np.ascontiguousarray(g.reshape(1, 1, -1)),)


def _grep_a_to_ours(a: np.ndarray) -> tuple[np.ndarray, ...]:
  return (np.ascontiguousarray(a.reshape(-1)),)  # (1, H, 1, 1) -> (H,)


def _grep_a_to_theirs(a: np.ndarray) -> tuple[np.ndarray, ...]:
  return (np.ascontiguousarray(a.reshape(1, -1, 1, 1)),)


def rules(cfg: BeatsConfig) -> list[Rule]:
  """The mapping table for one BEATs model (keys without any prefix)."""
  out: list[Rule] = []
  out += conv("patch_embedding", "patch_embedding", bias=cfg.conv_bias)
  out += layer_norm("layer_norm", "layer_norm")
  if cfg.embed_dim != cfg.encoder_embed_dim:
    out += linear("post_extract_proj", "post_extract_proj")
  # torch weight_norm(dim=2): weight_v (out, in/g, K) converts like a conv kernel; g is (1, 1, K).
  kernel_rule, bias_rule = conv("encoder.pos_conv", "encoder.pos_conv.0")
  out.append(rule("encoder.pos_conv.weight_v", "encoder.pos_conv.0.weight_v",
                  kernel_rule.to_ours, kernel_rule.to_theirs))
  out.append(bias_rule)
  out.append(rule("encoder.pos_conv.weight_g", "encoder.pos_conv.0.weight_g",
                  _weight_g_to_ours, _weight_g_to_theirs))
  if cfg.relative_position_embedding:
    out.append(rule("encoder.relative_attention_bias", _TABLE.format(i=0)))
  for i in range(cfg.encoder_layers):
    ours, theirs = f"encoder.layers.{i}", f"encoder.layers.{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += linear(f"{ours}.self_attn.{proj}", f"{theirs}.self_attn.{proj}")
    if cfg.gru_rel_pos:
      out += linear(f"{ours}.self_attn.grep_linear", f"{theirs}.self_attn.grep_linear")
      out.append(rule(f"{ours}.self_attn.grep_a", f"{theirs}.self_attn.grep_a",
                      _grep_a_to_ours, _grep_a_to_theirs))
    out += layer_norm(f"{ours}.self_attn_layer_norm", f"{theirs}.self_attn_layer_norm")
    out += linear(f"{ours}.fc1", f"{theirs}.fc1")
    out += linear(f"{ours}.fc2", f"{theirs}.fc2")
    out += layer_norm(f"{ours}.final_layer_norm", f"{theirs}.final_layer_norm")
  out += layer_norm("encoder.layer_norm", "encoder.layer_norm")
  return out


def check_shared_bias(cfg: BeatsConfig, state_dict: Mapping[str, np.ndarray], *,
                      prefix: str = "") -> None:
  """Raises `CheckpointKeyError` if a layer's copy of the relative table differs from layer 0's.

  Copies that are absent are fine (a deduplicated checkpoint); layer 0's key is required by
  `rules` and reported there when missing.
  """
  if not cfg.relative_position_embedding:
    return
  first = state_dict.get(prefix + _TABLE.format(i=0))
  if first is None:
    return
  bad = []
  for i in range(1, cfg.encoder_layers):
    key = prefix + _TABLE.format(i=i)
    if key in state_dict and not np.array_equal(np.asarray(state_dict[key]), np.asarray(first)):
      bad.append(key)
  if bad:
    listing = "\n".join(f"  {k}" for k in bad)
    raise CheckpointKeyError("relative position tables that differ from layer 0's "
                             f"(the reference shares one table):\n{listing}")


def load(model: nnx.Module, cfg: BeatsConfig, state_dict: Mapping[str, np.ndarray], *,
         prefix: str = "", ignore: tuple[str, ...] = (), **kwargs) -> LoadReport:
  """`check_shared_bias`, then `load_state_dict` with the tied copies ignored."""
  check_shared_bias(cfg, state_dict, prefix=prefix)
  return load_state_dict(model, rules(cfg), state_dict, prefix=prefix,
                         ignore=IGNORE + tuple(ignore), **kwargs)


def export(model: nnx.Module, cfg: BeatsConfig, *, prefix: str = "") -> dict[str, np.ndarray]:
  """Our parameters under BEATs keys, the relative table repeated under every layer."""
  out = export_state_dict(model, rules(cfg), prefix=prefix)
  if cfg.relative_position_embedding:
    table = out[prefix + _TABLE.format(i=0)]
    for i in range(1, cfg.encoder_layers):
      out[prefix + _TABLE.format(i=i)] = table.copy()
  return out


def from_state_dict(cfg: BeatsConfig, state_dict: Mapping[str, np.ndarray], *,
                    precision: Precision | None = None, prefix: str = "",
                    ignore: tuple[str, ...] = ()) -> Beats:
  """A `Beats` built abstractly (no random init) and filled from `state_dict`.

  Every parameter has a rule, so a successful load leaves nothing abstract; this is checked.
  """
  precision = precision or Precision.float32()
  model = nnx.eval_shape(lambda: Beats(cfg, precision=precision, rngs=nnx.Rngs(0)))
  load(model, cfg, state_dict, prefix=prefix, ignore=ignore)
  abstract = [k for k, v in flat_params(model).items()
              if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if abstract:
    raise CheckpointKeyError("parameters left without values:\n" + "\n".join(abstract))
  return model
