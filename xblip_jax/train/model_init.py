"""The model, built abstractly, materialised already sharded; pretrained towers load into shards.

    abstract = nnx.eval_shape(build)          # shapes, dtypes and logical names, no memory
    shardings = sharding.named_shardings(...) # trainable and frozen parts by their rule sets
    params, rest = jax.jit(create, out_shardings=shardings)()

Towers with pretrained weights (`model.llm_init`: "demo" or an Orbax directory of the LLM's
parameters; `model.encoders_init[<modality>]`: an Orbax directory of that encoder's) are left
out of `create` (XLA drops their random initialisation) and restored straight into their
shards by Orbax, each host reading only its own pieces.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from xblip_jax import sharding
from xblip_jax.models.build import build_model
from xblip_jax.models.xblip import XInstructBlip, trainable


@dataclasses.dataclass
class ShardedModel:
  """A model split into trainable `params` and frozen `rest`, both sharded over `mesh`."""

  graphdef: Any
  params: nnx.State
  rest: nnx.State
  param_shardings: Any
  rest_shardings: Any
  mesh: jax.sharding.Mesh

  def merge(self) -> XInstructBlip:
    return nnx.merge(self.graphdef, self.params, self.rest)

  def counts(self) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    n = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    return n(self.params), n(self.params) + n(self.rest)


def builder(config, modalities, vocab_size: int | None) -> Callable[[], XInstructBlip]:
  seed = int(config.seed)
  return lambda: build_model(config.model, modalities, seed=seed, llm_vocab_size=vocab_size)


def rule_sets(config) -> tuple[sharding.Rules, sharding.Rules]:
  """(trainable, frozen) logical-axis rules named by `config.sharding`."""
  cfg = config.get("sharding", {}) or {}
  return (sharding.rules(cfg.get("trainable", "fsdp_tensor")),
          sharding.rules(cfg.get("frozen", "fsdp_tensor")))


def _under(prefixes: tuple[tuple[str, ...], ...]):
  """NNX filter: variables under any of the `prefixes` (paths of pretrained towers)."""
  def keep(path: tuple, value) -> bool:
    del value
    return any(tuple(path[:len(p)]) == p for p in prefixes)
  return keep


def _subtree(state, prefix: tuple[str, ...]):
  for key in prefix:
    state = state[key]
  return state


def _nest(prefix: tuple[str, ...], value):
  for key in reversed(prefix):
    value = {key: value}
  return value


def restore_into_shards(path: Path, abstract_state, shardings):
  """An Orbax checkpoint of `abstract_state`'s tree, read directly into `shardings`."""
  target = sharding.abstract_with_shardings(abstract_state, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(path).absolute(), target)


def abstract_state(config, modalities, vocab_size, mesh):
  """(graphdef, abstract params, abstract rest, param shardings, rest shardings)."""
  abstract = nnx.eval_shape(builder(config, modalities, vocab_size))
  graphdef, params, rest = nnx.split(abstract, trainable, ...)
  train_rules, frozen_rules = rule_sets(config)
  return (graphdef, params, rest, sharding.named_shardings(params, mesh, train_rules),
          sharding.named_shardings(rest, mesh, frozen_rules))


def create_sharded(config, modalities, vocab_size: int | None, mesh, *,
                   weights: Mapping[tuple[str, ...], Path] | None = None) -> ShardedModel:
  """Materialises the model on `mesh`.

  Args:
    weights: pretrained towers, `{("llm",): dir, ("encoders", "image"): dir, ...}`: each an
      Orbax directory of that subtree's parameters, read straight into its shards; those towers
      are never randomly initialised.
  """
  weights = dict(weights or {})
  build = builder(config, modalities, vocab_size)
  abstract = nnx.eval_shape(build)
  train_rules, frozen_rules = rule_sets(config)
  graphdef, a_params, a_rest = nnx.split(abstract, trainable, ...)
  skip = _under(tuple(weights))
  _, _, a_pre, a_other = nnx.split(abstract, trainable, skip, ...)
  p_sh = sharding.named_shardings(a_params, mesh, train_rules)

  def create():
    _, p, _, other = nnx.split(build(), trainable, skip, ...)
    return p, other

  with jax.set_mesh(mesh):
    params, other = jax.jit(create, out_shardings=(
        p_sh, sharding.named_shardings(a_other, mesh, frozen_rules)))()
  states = [params, other]
  pre_sh = sharding.named_shardings(a_pre, mesh, frozen_rules)
  for prefix, path in weights.items():
    loaded = restore_into_shards(path, _subtree(a_pre, prefix), _subtree(pre_sh, prefix))
    states.append(nnx.State(_nest(prefix, loaded)))
  _, params, rest = nnx.split(nnx.merge(graphdef, *states), trainable, ...)
  return ShardedModel(graphdef, params, rest, p_sh,
                      sharding.named_shardings(a_rest, mesh, frozen_rules), mesh)
