"""A "pretrained" frozen 3D encoder for the demo: PointBERT's projection fitted to the demo clouds.

X-InstructBLIP's pc Q-Former reads ONE token per cloud, `cat(cls, max over groups) @
pc_projection` of a ULIP-2-pretrained PointBERT. A randomly initialised PointBERT keeps the
shape in that token (a linear probe on 64 demo clouds separates the four shapes at ~97%), but as
a small wobble on a large direction every cloud shares: after the Q-Former's LayerNorm the spread
between shapes is ~5% of the token's norm, and the bridge never learns to read it (the demo's 3D
answers stayed at chance while every other modality learned). Pretraining PointBERT as ULIP does
is out of reach for a laptop demo, so the demo does the cheapest thing that gives the token a
pretrained encoder's conditioning: it replaces the random `pc_projection` by the PCA whitening
of the training split's pooled features (no labels), with the shared mean direction sent to
zero, and keeps everything else random and frozen. Like the demo LLM it is fitted once, saved
with Orbax next to the demo data (`<demo data>/pretrained_pc_encoder`), and restored by every
later run through `model.encoders_init.pc = "demo"`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jaxtyping import Float

from xblip_jax import config_utils
from xblip_jax.data import demo
from xblip_jax.data.preprocess.pointcloud import preprocess_pc
from xblip_jax.models import build
from xblip_jax.models.encoders import registry

SUPPORTED = ("pc",)
_BATCH = 16


def whitening_projection(features: Float[np.ndarray, "N F"], width: int,
                         fallback: Float[np.ndarray, "F E"]) -> Float[np.ndarray, "F E"]:
  """A bias-free (F, E) projection: PCA whitening of `features`, mean direction mapped to 0.

  Components beyond the data's rank keep `fallback`'s columns (also cleared of the mean).
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"need at least two feature rows to fit a projection, got {x.shape}")
  mean = x.mean(0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  keep = int(min(width, np.sum(s > s[0] * 1e-6)))
  proj = np.array(fallback, np.float64, copy=True)
  proj[:, :keep] = vt[:keep].T / (s[:keep] / np.sqrt(x.shape[0]))[None]
  # No bias in `pc_projection`: remove the direction of the shared mean instead of the mean.
  proj -= np.outer(mean, mean @ proj) / max(float(mean @ mean), 1e-12)
  return proj.astype(np.float32)


def _train_clouds(inputs, npoints: int, seed: int) -> np.ndarray:
  clouds = []
  for name in inputs.train_names:
    for i, ex in enumerate(demo.read_demo(inputs.manifest[name]["train"])):
      if ex.modalities == ("pc",):
        clouds.append(preprocess_pc(ex.media_paths[0], rng=np.random.default_rng([seed, 13, i]),
                                    npoints=npoints))
  if len(clouds) < 2:
    raise config_utils.ConfigError("model.encoders_init.pc='demo' needs a training dataset "
                                   "with point clouds in data.train_datasets")
  return np.stack(clouds)


_pooled = nnx.jit(lambda encoder, xyz: encoder(xyz).pooled_features)


def pooled_features(encoder: nnx.Module, clouds: Float[np.ndarray, "N P 3"]
                    ) -> Float[np.ndarray, "N F"]:
  """PointBERT's `cat(cls, max over groups)` per cloud, before `pc_projection`."""
  return np.concatenate([np.asarray(_pooled(encoder, jnp.asarray(clouds[i:i + _BATCH])))
                         for i in range(0, len(clouds), _BATCH)])


def fit_pc_encoder(encoder: nnx.Module, clouds: Float[np.ndarray, "N P 3"]) -> None:
  """Sets `encoder.pc_projection` in place to the whitening of `clouds`' pooled features."""
  old = np.asarray(encoder.pc_projection[...])
  encoder.pc_projection[...] = jnp.asarray(
      whitening_projection(pooled_features(encoder, clouds), old.shape[1], old),
      encoder.pc_projection[...].dtype)


def ensure_pretrained(inputs, config, modality: str) -> Path:
  """`<demo data>/pretrained_<modality>_encoder`, fitted and saved first if absent."""
  if modality not in SUPPORTED:
    raise config_utils.ConfigError(f"model.encoders_init.{modality}='demo': the demo fits only "
                                   f"{SUPPORTED} encoders; give an Orbax directory or ''")
  path = (inputs.root / f"pretrained_{modality}_encoder").absolute()
  if path.exists():
    return path
  _, enc_cfgs = build.xblip_config(config.model, inputs.modalities,
                                   inputs.llm_tokenizer.vocab_size)
  encoder = registry.build_encoder(
      modality, enc_cfgs[modality],
      precision=build.precision(config.model.precision.encoders, "model.precision.encoders"),
      rngs=nnx.Rngs(params=int(config.seed)))
  clouds = _train_clouds(inputs, int(config.data.media.npoints), int(config.seed))
  fit_pc_encoder(encoder, clouds)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, nnx.state(encoder))
  logging.info("fitted the demo %s encoder's projection on %d training clouds, saved to %s",
               modality, len(clouds), path)
  return path
