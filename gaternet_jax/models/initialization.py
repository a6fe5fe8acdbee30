"""A model's initial variables, with one random draw per convolution-kernel shape.

flax draws every parameter with its own key, so ResNet-164-Gated's 184 convolution kernels are 184
separate random-number loops in the init program, and XLA:CPU took 19 s to compile it (1.2 s with
those draws left out; docs/performance.md). Here `model.init` runs as usual while an interceptor
notes every `nn.Conv`'s kernel initializer; then the kernels that share (initializer, shape,
dtype) are drawn together, one vmapped call per group (17 for ResNet-164-Gated), and XLA drops
the per-kernel draws nothing uses any more. Every kernel keeps its own initializer's distribution
(He-normal fan-out for the ResNets, Inception's truncated normal fan-in, ...); the values are a
different draw than flax's own, so this changed every seed's initial parameters once.

It is measured on XLA:CPU but is not a CPU-only choice, and must not become one: the initial
parameters are a pure function of the seed and the model, so a seed starts from the same
parameters on the CPU, a GPU and a TPU (a CPU-only grouping would give a config two different
starts). Fewer, batched random loops also cut the init program's compile time elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
from flax import traverse_util

Initializer = Callable[..., jax.Array]


def init_variables(model: nn.Module, key: jax.Array, rngs: dict[str, jax.Array], *args, **kwargs):
  """`model.init(rngs, *args, **kwargs)` with every nn.Conv kernel redrawn from `key`, grouped."""
  kernel_inits: dict[tuple[str, ...], Initializer] = {}

  def note_conv(next_fun, call_args, call_kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__':
      kernel_inits[(*context.module.path, 'kernel')] = context.module.kernel_init
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(note_conv):
    variables = model.init(rngs, *args, **kwargs)
  params = traverse_util.flatten_dict(variables['params'])
  params.update(
    grouped_draws(key, {path: (kernel_inits[path], params[path]) for path in kernel_inits})
  )
  return {**variables, 'params': traverse_util.unflatten_dict(params)}


def grouped_draws(
  key: jax.Array, leaves: dict[tuple[str, ...], tuple[Initializer, Any]]
) -> dict[tuple[str, ...], jax.Array]:
  """path -> (initializer, array or shape-dtype) to path -> a fresh draw of that initializer.

  Paths sharing (initializer, shape, dtype) form one group, drawn by one vmapped call; groups are
  numbered in the order of their first path, kernels within a group in path order, so the result
  is a pure function of `key` and the model's structure.
  """
  groups: dict[tuple, list[tuple[str, ...]]] = {}
  for path in sorted(leaves):
    init, like = leaves[path]
    groups.setdefault((init, tuple(like.shape), like.dtype), []).append(path)
  drawn = {}
  for index, ((init, shape, dtype), paths) in enumerate(groups.items()):
    keys = jax.random.split(jax.random.fold_in(key, index), len(paths))
    values = jax.vmap(lambda k, init=init, shape=shape, dtype=dtype: init(k, shape, dtype))(keys)
    drawn.update(zip(paths, values))
  return drawn
