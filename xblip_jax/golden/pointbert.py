"""Golden checker for `pointbert_*` cases: ULIP-2 PointBERT + `pc_projection` + `pc_ln`.

The config comes from the case's json (`meta["config"]`); parameters are loaded through the
converter table, so a wrong mapping fails here too. Every output of the case is compared: the
integer FPS/kNN indices exactly, floats with the README tolerances. `pc_ln` (the bridge's
LayerNorm, eps 1e-5) is applied here to reproduce `pc_embeds_ln_qformer_input`.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from xblip_jax.convert import pointbert_keys
from xblip_jax.convert.mapping import load_state_dict
from xblip_jax.golden.case import Case, Comparison, compare
from xblip_jax.models import layers
from xblip_jax.models.encoders.pointbert import PointBert, PointBertConfig, PointBertOutput

ATOL = RTOL = 1e-5
PC_LN_EPS = 1e-5  # blip2 LayerNorm(512) as X-InstructBLIP builds `pc_ln`
_PC_LN = "pc_ln."


def config_from_case(case: Case) -> PointBertConfig:
  return PointBertConfig.from_lavis(case.meta["config"])


def build(case: Case) -> tuple[PointBert, layers.LayerNorm]:
  """The model and `pc_ln`, loaded from the case's parameters (strict: every key accounted for)."""
  cfg = config_from_case(case)
  # Abstract construction: every variable is then filled by the (strict) load, and no random
  # initialiser has to be compiled.
  model = nnx.eval_shape(
      lambda: PointBert(cfg, precision=layers.Precision.float32(), rngs=nnx.Rngs(0)))
  tower = {k: v for k, v in case.params.items() if not k.startswith(_PC_LN)}
  load_state_dict(model, pointbert_keys.rules(cfg), tower, ignore=pointbert_keys.IGNORE)
  pc_ln = layers.LayerNorm(cfg.embed_dim, eps=PC_LN_EPS)
  pc_ln.scale.set_value(jax.numpy.asarray(case.params[_PC_LN + "weight"]))
  pc_ln.bias.set_value(jax.numpy.asarray(case.params[_PC_LN + "bias"]))
  return model, pc_ln


def outputs_by_golden_name(out: PointBertOutput, pc_ln: layers.LayerNorm) -> dict[str, np.ndarray]:
  named = {
      "fps_center_indices": out.center_indices,
      "knn_indices": out.knn_indices,
      "centers": out.centers,
      "neighborhood": out.neighborhood,
      "group_tokens_encoder": out.group_tokens,
      "group_tokens_reduce_dim": out.group_embeds,
      "pos_embed_centers": out.pos_embed,
      "tokens_after_norm": out.tokens,
      "point_encoder_concat_f": out.pooled_features,
      "pc_embed": out.pooled[:, 0],
      "pc_embeds_ln_qformer_input": pc_ln(out.pooled),
  }
  named.update({f"block_{i}_out": h for i, h in enumerate(out.hidden_states)})
  return {k: np.asarray(v) for k, v in named.items()}


def check(case: Case) -> list[Comparison]:
  model, pc_ln = build(case)
  out = nnx.jit(lambda m, xyz: m(xyz))(model, jax.numpy.asarray(case.inputs["points"]))
  ours = outputs_by_golden_name(out, pc_ln)
  comparisons = []
  for name, want in case.outputs.items():
    if name not in ours:
      # A golden output we do not reproduce must not pass silently.
      comparisons.append(Comparison(f"{name} (no counterpart)", float("inf"), ATOL, RTOL, False))
      continue
    comparisons.append(compare(name, ours[name], want, atol=ATOL, rtol=RTOL))
  depth = sum(bool(re.fullmatch(r"block_\d+_out", n)) for n in case.outputs)
  if depth and depth != len(out.hidden_states):
    comparisons.append(Comparison(f"depth {len(out.hidden_states)} != golden blocks {depth}",
                                  float("inf"), ATOL, RTOL, False))
  return comparisons
