"""Golden check of BEATs (`beats_*` cases): LAVIS `BEATs.extract_features` plus `audio_ln`.

Config and shapes come from the case's json (`config`); the LayerNorm eps of `audio_ln` is
LAVIS' default 1e-5 (blip2.py `LayerNorm`), the value X-InstructBLIP builds it with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xblip_jax.convert import beats_keys
from xblip_jax.golden.case import Case, Comparison, compare
from xblip_jax.models import layers
from xblip_jax.models.encoders.beats import Beats, BeatsConfig

AUDIO_LN_EPS = 1e-5
ATOL = RTOL = 1e-5


def build(case: Case) -> tuple[Beats, BeatsConfig]:
  """A float32 model holding the case's weights (built abstractly, filled by the key table)."""
  num_mel_bins = int(case.inputs["fbank"].shape[-1])
  cfg = BeatsConfig.from_lavis(case.meta["config"], num_mel_bins=num_mel_bins)
  model = beats_keys.from_state_dict(cfg, case.params, precision=layers.Precision.float32(),
                                     ignore=(r"audio_ln\..*",))
  return model, cfg


def audio_ln(case: Case) -> layers.LayerNorm:
  weight, bias = case.params["audio_ln.weight"], case.params["audio_ln.bias"]
  ln = layers.LayerNorm(weight.shape[0], eps=AUDIO_LN_EPS)
  ln.scale.set_value(jnp.asarray(weight))
  ln.bias.set_value(jnp.asarray(bias))
  return ln


@nnx.jit
def _outputs(model: Beats, ln: layers.LayerNorm | None, fbank: jax.Array,
             padding_mask: jax.Array | None) -> dict[str, jax.Array]:
  """Every output a case may hold, in one compiled program."""
  got: dict[str, jax.Array] = {}
  out = model(fbank, output_hidden_states=True)
  got["features"] = out.features
  for i, h in enumerate(out.hidden_states):
    got[f"layer_{i}_out"] = h
  if ln is not None:
    got["features_audio_ln"] = ln(out.features)
  if padding_mask is not None:
    masked = model(fbank, padding_mask)
    got["features_with_padding_mask"] = masked.features
    got["padding_mask_tokens"] = masked.padding_mask
  # Intermediates, stage by stage (unmasked input).
  patches = model.patch_features(fbank)
  got["patch_features_after_layer_norm"] = patches
  proj = model.post_extract_proj(patches) if model.post_extract_proj is not None else patches
  got["post_extract_proj_out"] = proj
  pos = model.encoder.pos_conv(proj)
  got["pos_conv_out"] = pos
  got["encoder_input_after_layer_norm"] = model.encoder.layer_norm(proj + pos)
  if model.cfg.relative_position_embedding:
    got["relative_position_bias_layer0"] = model.encoder.relative_position_bias(proj.shape[1])
  return got


def check(case: Case) -> list[Comparison]:
  model, _ = build(case)
  ln = audio_ln(case) if "audio_ln.weight" in case.params else None
  mask = case.inputs.get("padding_mask")
  with jax.default_matmul_precision("highest"):
    got = _outputs(model, ln, jnp.asarray(case.inputs["fbank"]),
                   None if mask is None else jnp.asarray(mask))
  # Every output the case holds is compared; one we cannot produce fails loudly.
  results = []
  for name, want in sorted(case.outputs.items()):
    if name not in got:
      results.append(Comparison(f"{name} (not produced)", float("inf"), ATOL, RTOL, False))
      continue
    results.append(compare(name, np.asarray(got[name]), want, atol=ATOL, rtol=RTOL))
  return results
