"""A "pretrained" frozen LLM for the demo: the tiny LLaMA learns the demo's language first.

X-InstructBLIP trains Q-Formers under a frozen, *pretrained* LLM. No LLM can be downloaded
here, and a randomly initialised one has near-uniform logits that no soft prefix can steer. So
the demo first trains its tiny LLaMA as a plain language model on the training split's
instruction/answer text (the media never enter), saves it with Orbax next to the demo data, and
every later run loads it and keeps it frozen, as a real run would load Vicuna.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from xblip_jax.data import demo, templates
from xblip_jax.data import text as text_lib
from xblip_jax.models import build
from xblip_jax.models.assembly import causal_lm_loss
from xblip_jax.models.llm.llama import Llama


def _corpus(inputs, num: int, seed: int) -> np.ndarray:
  """`num` rows of `[cue][instruction][answer </s>]` ids, padded, with LM labels."""
  rng = np.random.default_rng([seed, 11])
  cfg, tok = inputs.text_cfg, inputs.llm_tokenizer
  examples = [ex for name in inputs.train_names for ex in demo.read_demo(inputs.manifest[name]["train"])]
  length = cfg.llm_text_len + 8
  ids = np.full((num, length), tok.pad_id, np.int32)
  labels = np.full((num, length), text_lib.IGNORE, np.int32)
  for row in range(num):
    ex = templates.instruct(examples[int(rng.integers(len(examples)))], rng)
    cue = list(inputs.prompt_ids.cue(ex.modalities[0]))
    seq = (cue + text_lib.encode_instruction(tok, ex.text_input, cfg)
           + text_lib.encode_answer(tok, ex.text_output, cfg))[:length]
    ids[row, :len(seq)] = seq
    labels[row, :len(seq)] = seq
  return np.stack([ids, labels])


def pretrain(llm: Llama, inputs, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
  """Trains `llm` in place as a causal LM on the demo text; returns the final loss."""
  corpus = _corpus(inputs, num=4096, seed=seed)
  graphdef, params = nnx.split(llm, nnx.Param)
  warmup = min(20, steps // 2)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1)),
                   weight_decay=0.01)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, ids, labels):
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      mask = (ids != inputs.llm_tokenizer.pad_id).astype(jnp.int32)
      return causal_lm_loss(model(model.embed(ids), attention_mask=mask).logits, labels)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng([seed, 12])
  loss = float("nan")
  for i in range(steps):
    rows = rng.integers(corpus.shape[1], size=batch_size)
    params, opt_state, loss = step(params, opt_state, corpus[0, rows], corpus[1, rows])
    if i % 100 == 0 or i == steps - 1:
      logging.info("demo LLM pretraining step %d loss %.4f", i, float(loss))
  nnx.update(llm, params)
  return float(loss)


def ensure_pretrained(inputs, config) -> Path:
  """`<demo data>/pretrained_llm`: the demo LLM's parameters, trained and saved first if absent.

  The trainer restores them straight into their shards (`model_init.create_sharded`).
  """
  path = (inputs.root / "pretrained_llm").absolute()
  if path.exists():
    return path
  bridge, _ = build.xblip_config(config.model, inputs.modalities,
                                 inputs.llm_tokenizer.vocab_size)
  llm = Llama(bridge.llm, precision=build.precision(config.model.precision.llm,
                                                    "model.precision.llm"),
              rngs=nnx.Rngs(params=int(config.seed)))
  cfg = config.model.demo_llm
  loss = pretrain(llm, inputs, steps=int(cfg.steps), batch_size=int(cfg.batch_size),
                  lr=float(cfg.lr), seed=int(config.seed))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, nnx.state(llm, nnx.Param))
  logging.info("pretrained the demo LLM (final loss %.4f), saved to %s", loss, path)
  return path
