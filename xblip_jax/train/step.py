"""Jitted step functions: the training step (gradients for trainable state only) and the
evaluation functions (loss, greedy answers).

The model is split once into `graphdef`, trainable `params` and frozen `rest` (LLM, encoders);
steps merge them inside `jax.jit`, so the optimizer never sees a frozen parameter.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from xblip_jax.decode.greedy import greedy_decode
from xblip_jax.models import assembly
from xblip_jax.models.encoders import registry
from xblip_jax.models.xblip import XInstructBlip


def soft_tokens(model: XInstructBlip, batch: dict, order: Sequence[str], *,
                deterministic: bool, rngs: nnx.Rngs | None = None) -> dict:
  out = {}
  for m in order:
    feats = batch.get(f"{m}_features")
    if feats is None:
      feats = registry.encode(m, model.encoders[m], batch[m])
    out[m] = model.soft_tokens(m, feats, batch.get(f"{m}_qformer_ids", batch["qformer_ids"]),
                               batch.get(f"{m}_qformer_mask", batch["qformer_mask"]),
                               deterministic=deterministic, rngs=rngs)
  return out


def make_train_step(graphdef, tx: optax.GradientTransformation, prompt: assembly.PromptIds
                    ) -> Callable:
  """`step(params, opt_state, rest, batch, rng, order) -> (params, opt_state, metrics)`."""

  def loss_fn(params, rest, batch, rng, order):
    model = nnx.merge(graphdef, params, rest)
    soft = soft_tokens(model, batch, order, deterministic=False, rngs=nnx.Rngs(dropout=rng))
    out = model(soft, batch["llm_text_ids"], batch["llm_text_mask"], batch["llm_text_labels"],
                prompt, order)
    return out.loss, out.num_tokens

  @functools.partial(jax.jit, static_argnames=("order",), donate_argnums=(0, 1))
  def step(params, opt_state, rest, batch, rng, order):
    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, rest, batch, rng, order)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "tokens": tokens,
                               "grad_norm": optax.global_norm(grads)}

  return step


def make_eval_loss(graphdef, prompt: assembly.PromptIds) -> Callable:
  @functools.partial(jax.jit, static_argnames=("order",))
  def eval_loss(params, rest, batch, order):
    model = nnx.merge(graphdef, params, rest)
    soft = soft_tokens(model, batch, order, deterministic=True)
    out = model(soft, batch["llm_text_ids"], batch["llm_text_mask"], batch["llm_text_labels"],
                prompt, order)
    return out.loss * out.num_tokens, out.num_tokens

  return eval_loss


def make_generate(graphdef, prompt: assembly.PromptIds, *, max_new_tokens: int, eos_id: int,
                  pad_id: int) -> Callable:
  """Greedy answers for left-padded prompts (`prompt_ids`/`prompt_mask` in the batch)."""

  @functools.partial(jax.jit, static_argnames=("order",))
  def generate(params, rest, batch, order):
    model = nnx.merge(graphdef, params, rest)
    soft = soft_tokens(model, batch, order, deterministic=True)
    embeds, mask, _ = assembly.assemble(model.llm.embed, soft, batch["prompt_ids"],
                                        batch["prompt_mask"], None, prompt, order,
                                        layout="single", use_cues=model.cfg.use_cues)
    return greedy_decode(model.llm, embeds, mask, max_new_tokens=max_new_tokens,
                         eos_id=eos_id, pad_id=pad_id)

  return generate


def check_finite(metrics: dict, step: int) -> None:
  loss = float(metrics["loss"])
  if not jnp.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} at step {step}; the last good checkpoint "
                             "is kept and a restart resumes from it")
