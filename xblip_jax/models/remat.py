"""Rematerialisation of a module call that works whatever trace the module's variables live in.

`nnx.remat` in graph mode refuses a module whose variables come from an outer trace (a model
merged from state closed over by `jax.value_and_grad` inside `jax.jit` raises
`TraceContextError: Cannot mutate Param from a different trace level`). The frozen towers hit
exactly that: their state is a jit argument, the gradient is taken with respect to other
parameters. `checkpointed` instead splits the module and rematerialises a pure function of its
state with `jax.checkpoint` (same policies). The wrapped call must not mutate the module (no
batch statistics, no RNG streams): the recomputed copy's updates would be lost.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def checkpointed(fn: Callable[..., object], policy: Callable | None = None
                 ) -> Callable[..., object]:
  """`fn(module, *args)` rematerialised in the backward pass; `policy` as `jax.checkpoint`'s.

  `args` must be pytrees of arrays (None allowed).
  """

  def run(module: M, *args):
    graphdef, state = nnx.split(module)

    def pure(state, *args):
      return fn(nnx.merge(graphdef, state), *args)

    return jax.checkpoint(pure, policy=policy)(state, *args)

  return run
