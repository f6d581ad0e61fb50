"""The training loss runs the LM head on the label-carrying text positions only
(`assembly.text_lm_loss`, `XInstructBlip.__call__(..., logits=False)`, `train.step.lm_loss`):
its value and the bridge's gradients equal the full-logits path (`causal_lm_loss`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xblip_jax.data.text import IGNORE
from xblip_jax.models import assembly
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip, trainable
from xblip_jax.train import step as step_lib

B, WIDTH, NQ, L, QL = 3, 16, 3, 10, 5
PREFIX = (1, 21, 22, 23)
CUES = (("image", (1, 30, 31)), ("video", (1, 32, 33, 34)), ("audio", (1, 35)))


def _model(seed: int, tied: bool, layout: str) -> XInstructBlip:
  cfg = XBlipConfig(
      encoder_widths=(("image", WIDTH), ("video", WIDTH + 8), ("audio", WIDTH)),
      qformer=QFormerConfig.tiny(encoder_width=WIDTH, num_layers=1, num_query_tokens=NQ,
                                 hidden_size=32, intermediate_size=64, hidden_dropout=0.0,
                                 attention_dropout=0.0),
      llm=LlamaConfig.tiny(vocab_size=97, num_layers=1, tie_word_embeddings=tied),
      num_query_tokens=NQ, layout=layout)
  return XInstructBlip(cfg, rngs=nnx.Rngs(seed))


def _batch(seed: int, order: tuple[str, ...]) -> dict:
  """Right-padded text whose labels sit on a random answer span of each row (one row with no
  label at all), and padded Q-Former text."""
  rng = np.random.default_rng(seed)
  length = rng.integers(3, L + 1, B)
  length[0] = L
  mask = (np.arange(L)[None] < length[:, None]).astype(np.int32)
  ids = rng.integers(40, 97, (B, L)).astype(np.int32) * mask
  start = np.array([rng.integers(1, n) for n in length])
  labels = np.where((np.arange(L)[None] >= start[:, None]) & (mask == 1), ids, IGNORE)
  labels[-1] = IGNORE
  q_len = rng.integers(1, QL + 1, B)
  q_mask = (np.arange(QL)[None] < q_len[:, None]).astype(np.int32)
  batch = {"llm_text_ids": ids, "llm_text_mask": mask, "llm_text_labels": labels.astype(np.int32),
           "qformer_ids": rng.integers(100, 900, (B, QL)).astype(np.int32) * q_mask,
           "qformer_mask": q_mask}
  frames = {"image": 1, "video": 2, "audio": 3}
  for m in order:
    width = WIDTH + 8 if m == "video" else WIDTH
    batch[f"{m}_features"] = rng.standard_normal((B, frames[m], 5, width)).astype(np.float32)
  return jax.tree.map(jnp.asarray, batch)


def _loss_and_grads(graphdef, params, rest, batch, order, prompt, logits: bool):
  """Through the full logits, or through the training step's loss (`step.lm_loss`)."""
  def loss(p):
    model = nnx.merge(graphdef, p, rest)
    if not logits:
      return step_lib.lm_loss(model, batch, order, prompt, deterministic=True)
    soft = step_lib.soft_tokens(model, batch, order, deterministic=True)
    out = model(soft, batch["llm_text_ids"], batch["llm_text_mask"], batch["llm_text_labels"],
                prompt, order, logits=True)
    return out.loss, out.num_tokens
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("seed,tied,layout,order,prefix", [
    (0, False, "reference_forward", ("video", "image"), PREFIX),
    (1, True, "single", ("audio", "video"), ()),
])
def test_bridge_loss_and_gradients_equal_full_logits(seed, tied, layout, order, prefix):
  model = _model(seed, tied, layout)
  graphdef, params, rest = nnx.split(model, trainable, ...)
  prompt = assembly.PromptIds(prefix=prefix, cues=CUES)
  batch = _batch(seed, order)
  (full, n_full), g_full = _loss_and_grads(graphdef, params, rest, batch, order, prompt, True)
  (part, n_part), g_part = _loss_and_grads(graphdef, params, rest, batch, order, prompt, False)
  assert int(n_full) == int(n_part) == int((batch["llm_text_labels"] != IGNORE).sum()) > 0
  np.testing.assert_allclose(float(part), float(full), rtol=1e-6)
  flat_full, flat_part = nnx.to_flat_state(g_full), nnx.to_flat_state(g_part)
  assert [p for p, _ in flat_full] == [p for p, _ in flat_part]
  pairs = [(path, np.asarray(a.get_value()), np.asarray(b.get_value()))
           for (path, a), (_, b) in zip(flat_full, flat_part)]
  # Against the largest gradient: tensors whose gradient is mathematically zero (key biases,
  # absent modalities) hold rounding noise of either sign.
  scale = max(float(np.abs(a).max()) for _, a, _ in pairs)
  for path, a, b in pairs:
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * scale, err_msg=str(path))
  for m in order:  # the gradients reach the bridges of the batch's modalities
    assert max(float(np.abs(a).max()) for p, a, _ in pairs if m in p) > 1e-3 * scale


@pytest.mark.parametrize("buckets", [1, 8])
def test_text_lm_loss_value_and_gradient(buckets):
  """Against the full logits, for every bucket count: a sequence that is the text block alone
  (its first token predicted by nothing), a prefix (labelled IGNORE as `assemble` does), rows
  with scattered labels, a fully labelled row (the largest capacity), no label at all."""
  rng = np.random.default_rng(buckets)
  hidden = jnp.asarray(rng.standard_normal((3, 9, 8)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((8, 11)), jnp.float32)
  head = lambda h: h @ table
  ids = jnp.asarray(rng.integers(0, 11, (3, 9)), jnp.int32)
  scattered = jnp.where(jnp.asarray(rng.random((3, 9)) < 0.4), ids, IGNORE)
  cases = [scattered, scattered.at[1].set(ids[1]), jnp.full_like(ids, IGNORE)]
  for labels in cases:
    for prefix in (0, 2):
      h = jnp.concatenate([0.5 * hidden[:, :prefix], hidden], axis=1)
      full = jnp.concatenate([jnp.full((3, prefix), IGNORE), labels], axis=1)
      want = jax.value_and_grad(lambda x: assembly.causal_lm_loss(head(x), full)[0])(h)
      got = jax.value_and_grad(
          lambda x: assembly.text_lm_loss(x, labels, head, buckets=buckets)[0])(h)
      np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
      np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=0, atol=1e-6)
      count = assembly.text_lm_loss(h, labels, head, buckets=buckets)[1]
      assert int(count) == int(assembly.causal_lm_loss(head(h), full)[1])


def test_text_lm_loss_runs_the_head_on_the_text_rows_only():
  rows = []
  hidden, labels = jnp.zeros((2, 7, 4)), jnp.full((2, 5), IGNORE)
  assembly.text_lm_loss(hidden, labels, lambda h: rows.append(h.shape) or h, buckets=1)
  assert rows == [(2, 5, 4)]
  with pytest.raises(ValueError, match="longer than the sequence"):
    assembly.text_lm_loss(hidden[:, :3], labels, lambda h: h)
