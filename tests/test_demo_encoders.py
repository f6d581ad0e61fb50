"""The demo's fitted 3D encoder: the whitening projection and its save / restore path."""

import numpy as np
import pytest
from flax import nnx

from xblip_jax.data import demo_media
from xblip_jax.data.preprocess.pointcloud import pc_norm, sample_points
from xblip_jax.models.encoders.pointbert import PointBert, PointBertConfig
from xblip_jax.models.layers import Precision
from xblip_jax.train import demo_encoders


def _ln(z):
  return (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)


def test_whitening_spreads_a_small_signal_riding_on_a_shared_direction():
  rng = np.random.default_rng(3)
  n, f, e, groups = 120, 40, 8, 3
  labels = rng.integers(groups, size=n)
  shared = 50.0 * rng.standard_normal(f)
  signal = rng.standard_normal((groups, f))
  feats = shared + signal[labels] + 0.05 * rng.standard_normal((n, f))
  fallback = rng.standard_normal((f, e))
  proj = demo_encoders.whitening_projection(feats, e, fallback)
  assert proj.shape == (f, e) and proj.dtype == np.float32

  def spread(tokens):  # between-group spread of the per-token normalised outputs over their mean
    z = _ln(tokens)
    means = np.stack([z[labels == g].mean(0) for g in range(groups)])
    return np.linalg.norm(means.std(0)) / np.linalg.norm(z.mean(0))

  assert spread(feats @ proj) > 20 * spread(feats @ fallback)
  # The shared mean direction is mapped to zero (the projection has no bias to remove it).
  np.testing.assert_allclose(feats.mean(0) @ proj, 0.0, atol=1e-3)


def test_whitening_keeps_fallback_columns_beyond_the_data_rank():
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((3, 10))       # rank 2 after centring
  fallback = rng.standard_normal((10, 6))
  proj = demo_encoders.whitening_projection(feats, 6, fallback)
  mean = feats.mean(0)
  cleared = fallback - np.outer(mean, mean @ fallback) / (mean @ mean)
  np.testing.assert_allclose(proj[:, 2:], cleared[:, 2:], rtol=1e-5, atol=1e-6)
  # The fitted columns carry the data's two directions of spread, and nothing of its mean.
  assert np.linalg.matrix_rank((feats - mean) @ proj[:, :2], tol=1e-3) == 2
  np.testing.assert_allclose(mean @ proj, 0.0, atol=1e-4)
  with pytest.raises(ValueError, match="two feature rows"):
    demo_encoders.whitening_projection(feats[:1], 6, fallback)


def test_fitted_pointbert_separates_demo_shapes_in_its_one_token():
  cfg = PointBertConfig.tiny(npoints=256, num_group=16, group_size=16, embed_dim=16)
  enc = PointBert(cfg, precision=Precision(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  shapes = demo_media.SHAPES_3D
  labels = np.arange(32) % len(shapes)
  clouds = np.stack([sample_points(pc_norm(demo_media.surface_points(shapes[k], 256, rng)),
                                   cfg.npoints, rng) for k in labels]).astype(np.float32)
  feats = demo_encoders.pooled_features(enc, clouds)
  before = feats @ np.asarray(enc.pc_projection[...])
  demo_encoders.fit_pc_encoder(enc, clouds)
  fitted = np.asarray(enc.pc_projection[...])
  np.testing.assert_allclose(fitted, demo_encoders.whitening_projection(feats, 16, fitted))
  after = feats @ fitted  # = the encoder's pooled token now (`pooled = feats @ pc_projection`)

  def spread(tokens):
    z = _ln(tokens)
    means = np.stack([z[labels == g].mean(0) for g in range(len(shapes))])
    return np.linalg.norm(means.std(0)) / np.linalg.norm(z.mean(0))

  assert spread(after) > 5 * spread(before)
