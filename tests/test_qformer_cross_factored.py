"""The Q-Former's factored cross-attention ((q Wk^T) kv^T, (P kv) Wv) against the projected
form, values and gradients, and the last layer's split rows against the joined ones."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xblip_jax.models.layers import Precision
from xblip_jax.models.qformer import QFormer, QFormerConfig, _Attention

# 8 queries, 40 encoder tokens of width 56: folding the kernels into the queries is cheaper.
CFG = QFormerConfig.tiny(encoder_width=56, hidden_size=64, num_heads=4, num_layers=2,
                         num_query_tokens=8, vocab_size=60, max_position_embeddings=16,
                         hidden_dropout=0.0, attention_dropout=0.0)


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def test_factored_cross_attention_matches_projected():
  attn = _Attention(CFG, CFG.encoder_width, "enc_embed", precision=Precision.float32(),
                    rngs=nnx.Rngs(0), may_factor=True)
  graphdef, params = nnx.split(attn, nnx.Param)
  params = _random_like(params, 1)  # biases off zero, so both bias terms are exercised
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((2, 40, 56)), jnp.float32)
  bias = jnp.where(jnp.asarray(rng.random((2, 40)) > 0.3), 0.0, jnp.finfo(jnp.float32).min)
  assert attn._factored(8, 40, 56)

  def run(factor, p, x, kv):
    m = nnx.merge(graphdef, p)
    m.may_factor = factor
    return m(x, kv, bias, True, None)

  def loss(factor, p, x, kv):
    return jnp.sum(jnp.sin(run(factor, p, x, kv)))

  np.testing.assert_allclose(run(True, params, x, kv), run(False, params, x, kv), atol=2e-6)
  g_fac = jax.grad(lambda *a: loss(True, *a), argnums=(0, 1, 2))(params, x, kv)
  g_ref = jax.grad(lambda *a: loss(False, *a), argnums=(0, 1, 2))(params, x, kv)
  for a, b in zip(jax.tree.leaves(g_fac), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_last_layer_split_rows_match_joined_layer():
  model = QFormer(CFG, precision=Precision.float32(), rngs=nnx.Rngs(2))
  rng = np.random.default_rng(3)
  queries = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
  enc = jnp.asarray(rng.standard_normal((2, 40, 56)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 60, (2, 5)), jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)
  out = model(queries, enc, ids, mask, return_hidden_states=True)
  # The last layer run joined on the previous layer's output gives the same rows.
  bias = (1.0 - jnp.concatenate([jnp.ones((2, 8)), mask.astype(jnp.float32)], 1)) * -10000.0
  joined = model.layers[-1](out.hidden_states[-2], 8, bias, enc, jnp.zeros((2, 40)), True, None)
  np.testing.assert_allclose(out.last_hidden_state, joined, atol=2e-6)
  np.testing.assert_allclose(out.query_output, joined[:, :8], atol=2e-6)
