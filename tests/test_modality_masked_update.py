"""One modality per batch: a step leaves the bridges of absent modalities (parameters and AdamW
moments) bit-identical and moves the present ones; over all modalities it is plain optax."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from xblip_jax.models.assembly import PromptIds
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip, trainable
from xblip_jax.train import optim
from xblip_jax.train import step as step_lib

B, WIDTH, NQ, T, L = 4, 16, 2, 12, 6
PROMPT = PromptIds(cues=(("image", (2, 7, 8)), ("video", (2, 9, 10))))
OPTIM = optim.OptimConfig(init_lr=1e-2, warmup_lr=1e-2, warmup_steps=0, weight_decay=0.05)


def _model(shared: bool):
  cfg = XBlipConfig(
      encoder_widths=(("image", WIDTH), ("video", WIDTH)),
      qformer=QFormerConfig.tiny(encoder_width=WIDTH, num_layers=1, num_query_tokens=NQ,
                                 hidden_size=32, intermediate_size=64, hidden_dropout=0.0,
                                 attention_dropout=0.0),
      llm=LlamaConfig.tiny(vocab_size=64, num_layers=1), num_query_tokens=NQ, shared_qformer=shared,
      shared_qformer_width=WIDTH)
  return nnx.split(XInstructBlip(cfg, rngs=nnx.Rngs(0)), trainable, ...)


def _batch(seed: int, order) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(11, 64, (B, T)).astype(np.int32)
  batch = {"llm_text_ids": ids, "llm_text_mask": np.ones((B, T), np.int32),
           "llm_text_labels": np.where(np.arange(T) >= T // 2, ids, -100).astype(np.int32),
           "qformer_ids": rng.integers(100, 900, (B, L)).astype(np.int32),
           "qformer_mask": np.ones((B, L), np.int32)}
  for m in order:
    batch[f"{m}_features"] = rng.normal(size=(B, 1, 5, WIDTH)).astype(np.float32)
  return batch


@jax.jit
def _warm_state(params):
  """AdamW state after one step of gradients 0.1 everywhere: momentum that could drift."""
  tx = optim.make_optimizer(OPTIM)
  grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 0.1), params)
  return tx.update(grads, tx.init(params), params)[1]


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _moments(opt_state) -> dict[str, np.ndarray]:
  return {k: v for k, v in _flat(opt_state).items() if ".mu" in k or ".nu" in k}


def _is(key: str, modality: str) -> bool:
  return f"['{modality}']" in key


@pytest.mark.parametrize("shared,microbatches", [(False, 2), (True, 1)])
def test_absent_modality_stays_bit_identical(shared, microbatches):
  graphdef, params, rest = _model(shared)
  tx = optim.make_optimizer(OPTIM)
  train = step_lib.make_train_step(graphdef, tx, PROMPT, microbatches=microbatches)
  opt_state = _warm_state(params)
  before, moments_before = _flat(params), _moments(opt_state)
  assert any(np.any(v != 0) for k, v in moments_before.items() if _is(k, "video"))
  params, opt_state, metrics = train(params, opt_state, rest, _batch(1, ("image",)),
                                     jax.random.key(1), ("image",))
  assert np.isfinite(float(metrics["loss"]))
  after, moments_after = _flat(params), _moments(opt_state)

  video = [k for k in before if _is(k, "video")]
  assert video and all(before[k].tobytes() == after[k].tobytes() for k in video)
  video_moments = [k for k in moments_before if _is(k, "video")]
  assert len(video_moments) == 2 * len(video)
  assert all(moments_before[k].tobytes() == moments_after[k].tobytes() for k in video_moments)
  # The image bridge (and a shared Q-Former) moves.
  moved = lambda k: not np.array_equal(before[k], after[k])
  image = [k for k in before if _is(k, "image")]
  assert image and all(moved(k) for k in image if "kernel" in k or "query_tokens" in k)
  shared_keys = [k for k in before if _is(k, "shared")]
  assert bool(shared_keys) == shared
  assert all(moved(k) for k in shared_keys if "query_tokens" in k or "llm_proj" in k)


def test_plain_adamw_would_move_the_absent_modality():
  """The failure the mask prevents: optax's own update moves zero-gradient video leaves."""
  _, params, _ = _model(False)
  tx = optim.make_optimizer(OPTIM)
  state = _warm_state(params)
  zero_video = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if _is(jax.tree_util.keystr(p), "video") else x, params)
  updates, _ = jax.jit(tx.update)(zero_video, state, params)
  plain = _flat(updates)
  assert any(np.any(v != 0) for k, v in plain.items() if _is(k, "video"))
  masked, _ = jax.jit(optim.masked_update, static_argnums=(0, 4))(tx, zero_video, state, params,
                                                                 ("image",))
  assert all(v.tobytes() == _flat(params)[k].tobytes()
             for k, v in _flat(masked).items() if _is(k, "video"))


def test_step_over_all_modalities_is_the_plain_update():
  graphdef, params, rest = _model(False)
  tx = optim.make_optimizer(OPTIM)
  order = ("image", "video")
  batch, key = _batch(2, order), jax.random.key(2)
  opt_state = tx.init(params)

  @jax.jit
  def plain(params, opt_state, rest, batch):
    def loss(params):
      model = nnx.merge(graphdef, params, rest)
      return step_lib.lm_loss(model, batch, order, PROMPT, deterministic=False,
                              rngs=nnx.Rngs(dropout=key))[0]
    updates, state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), state

  want_params, want_state = jax.tree.map(np.asarray, plain(params, opt_state, rest, batch))
  train = step_lib.make_train_step(graphdef, tx, PROMPT)
  got_params, got_state, _ = train(params, opt_state, rest, batch, key, order)
  for want, got in ((want_params, got_params), (want_state, got_state)):
    want, got = _flat(want), _flat(got)
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_bias_correction_counts_each_bridges_own_batches_like_torch_adamw():
  """One modality per batch against torch AdamW, where an unused bridge's grad is None: its
  per-parameter `step` (bias correction) counts only its own batches, its rate follows the
  global schedule, weight decay on ndim >= 2 only."""
  torch = pytest.importorskip("torch")
  cfg = optim.OptimConfig(init_lr=3e-2, warmup_lr=1e-3, warmup_steps=4, iters_per_epoch=5,
                          num_epochs=3, weight_decay=0.05)
  rng = np.random.default_rng(0)
  shapes = {("ln", "image", "scale"): (6,), ("ln", "pc", "scale"): (5,),
            ("llm_proj", "image", "kernel"): (6, 4), ("llm_proj", "pc", "kernel"): (5, 4),
            ("query_tokens", "pc"): (1, 2, 3)}
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}

  def nest(flat):
    out = {}
    for path, v in flat.items():
      d = out
      for key in path[:-1]:
        d = d.setdefault(key, {})
      d[path[-1]] = v
    return out

  orders = [("image",), ("pc",), ("image",), ("image",), ("image",), ("pc",), ("pc",),
            ("image",), ("pc",), ("image",), ("image",), ("pc",)]
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in orders]

  tx = optim.make_optimizer(cfg)
  params = nest(init)
  state = tx.init(params)
  update = jax.jit(optim.masked_update, static_argnums=(0, 4))
  for order, g in zip(orders, grads):
    zeroed = {k: (v if optim.leaf_group(tuple(jax.tree_util.DictKey(p) for p in k)) in order
                  else np.zeros_like(v)) for k, v in g.items()}
    params, state = update(tx, nest(zeroed), state, params, order)

  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  opt = torch.optim.AdamW(
      [{"params": [p for k, p in tp.items() if p.ndim >= 2], "weight_decay": 0.05},
       {"params": [p for k, p in tp.items() if p.ndim < 2], "weight_decay": 0.0}],
      lr=cfg.init_lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
  schedule = optim.lavis_schedule(cfg)
  for t, (order, g) in enumerate(zip(orders, grads)):
    for group in opt.param_groups:
      group["lr"] = float(schedule(t))
    for k, p in tp.items():
      p.grad = torch.tensor(g[k]) if k[1] in order else None
    opt.step()

  flat = {tuple(_key_names(p)): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for k, p in tp.items():
    np.testing.assert_allclose(flat[k], p.detach().numpy(), rtol=1e-5, atol=2e-6, err_msg=str(k))


def _key_names(path):
  return [getattr(k, "key", k) for k in path]
