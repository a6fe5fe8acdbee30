"""Every convolution's input kept in memory for the backward pass (a compilation hint for XLA:CPU).

A convolution's weight gradient reads the convolution's input again. XLA:CPU first transposes that
input to batch-minor ([N,H,W,C] -> [C,H,W,N]), and its fusion pass builds each of those transposes
from the cheap element-wise ops that produced the input, recomputing them instead of reading the
copy the forward pass already wrote. In a ResNet the input is the residual stream, so one
transpose re-derived batch norm, ReLU and the shortcut sum of up to four earlier layers from their
convolutions' outputs. On the 2-core CPU (ResNet-20, batch 128, a ~535 ms step) those transposes
took ~200 ms of thread time per step, ~62 ms with the barriers (docs/performance.md).

`jax.lax.optimization_barrier` on each convolution's input stops that: nothing fuses across it,
so the transpose reads the stored input. XLA:CPU normally removes barriers before fusion; the CPU
XLA flags (`flags.CPU_XLA_FLAGS`) keep them (`--xla_disable_hlo_passes=cse_barrier_expander`);
without that flag the barriers are removed and nothing changes. A barrier is the identity, so the
values computed are the same.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax


def _barrier_on_conv_input(next_fun, args, kwargs, context):
  if isinstance(context.module, nn.Conv) and context.method_name == '__call__' and args:
    args = (jax.lax.optimization_barrier(args[0]), *args[1:])
  return next_fun(*args, **kwargs)


def conv_inputs_materialized(enabled: bool = True) -> contextlib.AbstractContextManager:
  """While tracing inside this context, every `nn.Conv` call gets its input through a barrier."""
  return nn.intercept_methods(_barrier_on_conv_input) if enabled else contextlib.nullcontext()
