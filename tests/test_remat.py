"""Rematerialisation (`models/remat.py`) under the trainer's pattern: a model merged inside
`jax.value_and_grad` from state that is a `jax.jit` argument (the frozen part closed over, the
gradient taken for the rest and the inputs). With remat on, values and gradients equal those
without, for every LLaMA policy and for EVA; the checkpoint is really in the program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import Llama, LlamaConfig


def _norms(path, _) -> bool:  # the "trainable" part: every norm scale
  return any("norm" in str(p) for p in path)


def _randomise(model, seed: int):
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var.get_value().shape
    var.set_value(jnp.asarray(rng.normal(1.0 if len(shape) == 1 else 0.0,
                                         shape[0] ** -0.5, shape), jnp.float32))
  return model


def _value_and_grads(model, forward, x):
  """jit(value_and_grad) of `sum(sin(forward(model, x)))` w.r.t. the norms and `x`, the rest of
  the state a jit argument closed over by the differentiated function (as `train.step`)."""
  graphdef, train, frozen = nnx.split(model, _norms, ...)

  @jax.jit
  def run(train, frozen, x):
    def loss(train, x):
      return jnp.sum(jnp.sin(forward(nnx.merge(graphdef, train, frozen), x)))
    return jax.value_and_grad(loss, argnums=(0, 1))(train, x)

  jaxpr = str(jax.make_jaxpr(run)(train, frozen, x))
  return run(train, frozen, x), ("checkpoint" in jaxpr or "remat" in jaxpr)


def _assert_same(a, b):
  """Equal up to float32 rounding (recomputation may order sums differently), per tensor."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


def test_llama_remat_gradients_equal_plain():
  cfg = LlamaConfig.tiny(vocab_size=61, num_kv_heads=2, num_layers=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, cfg.hidden_size)), jnp.float32)

  def forward(model, x):
    return model(x, attention_mask=jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])).logits

  results = {}
  for policy in ("none", "full", "dots"):
    model = _randomise(nnx.eval_shape(lambda p=policy: Llama(
        dataclasses.replace(cfg, remat_policy=p), precision=Precision(),
        rngs=nnx.Rngs(0))), seed=1)
    results[policy], has_checkpoint = _value_and_grads(model, forward, x)
    assert has_checkpoint == (policy != "none"), policy
  assert np.abs(np.asarray(results["none"][1][1])).max() > 0
  for policy in ("full", "dots"):
    _assert_same(results[policy], results["none"])


def test_eva_remat_gradients_equal_plain():
  cfg = EvaViTConfig.tiny()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, cfg.img_size, cfg.img_size, 3)),
                  jnp.float32)

  def build(r):
    return _randomise(nnx.eval_shape(lambda: EvaViT(dataclasses.replace(cfg, remat=r),
                                                    precision=Precision(),
                                                    rngs=nnx.Rngs(0))), seed=2)

  got, has_checkpoint = _value_and_grads(build(True), lambda m, x: m(x), x)
  want, plain_has_checkpoint = _value_and_grads(build(False), lambda m, x: m(x), x)
  assert has_checkpoint and not plain_has_checkpoint
  _assert_same(got, want)
