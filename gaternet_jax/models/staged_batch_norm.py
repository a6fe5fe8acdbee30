"""Training-mode batch norm with its sums over the batch taken in two stages (for XLA:CPU).

Batch norm over x[M, C] (M = batch x height x width rows, C channels) needs per-channel sums over
the M rows: sum(x) and sum(x^2) forward, sum(dy) and sum(dy * x_hat) backward. XLA:CPU rewrites
each such long reduction into a `reduce-window` that cannot fuse with the element-wise op that
feeds it, so x^2 or dy * x_hat is first written out in full and read back, and the window runs
over only a few output rows. For ResNet-20's [128, 32, 32, 16] activations sum(x) and sum(x^2)
take 2.1-2.2 ms that way on the 2-core CPU, 0.17 ms as below.

Here each sum is taken in two stages: first over groups of `GROUP_ROWS` consecutive rows
([M, C] -> [M / 16, C]), a short reduction that XLA:CPU fuses with its producer and splits across
threads, then over the partial sums, which are small. An `optimization_barrier` between the stages
keeps XLA's simplifier from merging them back into one long reduction; it survives only with the
CPU XLA flags (`environment.CPU_XLA_FLAGS`), and without them the result is the usual program.
A custom VJP gives the backward pass the same staged sums (autodiff would emit long reductions).

`batch_norm_staged()` swaps this computation into `flax.linen.BatchNorm` while tracing: the same
variables, equations and running-average update; only the order of summation differs (float
rounding). Calls it does not cover (evaluation, initialisation, masks, named axes, a feature
axis other than the last) run Flax's own code.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

# Rows per first-stage partial sum. Sum and sum of squares of [128, 32, 32, 16] on the 2-core CPU:
# groups of 8 rows 0.20-0.21 ms, 16 rows 0.17-0.18 ms, 32 rows 0.18-0.19 ms. A third stage (sums of
# groups of partial sums, again behind a barrier) gained nothing in the ResNet-20 train step and
# adds compile time.
GROUP_ROWS = 16


def _group_sums(rows: jax.Array) -> jax.Array:
  """rows[M, C] -> [ceil(M / GROUP_ROWS), C]: sums of consecutive groups of GROUP_ROWS rows."""
  m, c = rows.shape
  width = min(GROUP_ROWS, m)
  whole = m - m % width
  partial = rows[:whole].reshape(whole // width, width, c).sum(axis=1)
  if whole < m:  # the last m % width rows join the first group
    partial = partial.at[0].add(rows[whole:].sum(axis=0))
  return partial


def staged_sums(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """sum(a, axis=0) for each a[M, C], in two stages with one barrier between them."""
  partials = jax.lax.optimization_barrier(tuple(_group_sums(a) for a in arrays))
  return tuple(partial.sum(axis=0) for partial in partials)


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x, scale, bias, epsilon):
  """(y, mean, var): y = (x - mean) / sqrt(var + epsilon) * scale + bias over all but x's last
  axis; y, mean and var are float32 (the caller casts y)."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  rows = _rows(x)
  m = rows.shape[0]
  total, total_sq = staged_sums(rows, rows * rows)
  mean = total / m
  # Flax's fast variance, E[x^2] - E[x]^2, clipped at 0 because the difference can round below.
  var = jnp.maximum(0.0, total_sq / m - mean * mean)
  inv_std = jax.lax.rsqrt(var + epsilon)
  y = ((rows - mean) * (inv_std * scale) + bias).reshape(x.shape)
  # A scalar carries bias's dtype to the backward pass (its cotangent must have it).
  return (y, mean, var), (x, mean, inv_std, scale, jnp.zeros((), bias.dtype))


def _backward(epsilon, residuals, cotangents):
  del epsilon  # inv_std holds it
  x, mean, inv_std, scale, bias_like = residuals
  dy, dmean, dvar = cotangents
  rows, g = _rows(x), _rows(dy)
  m = rows.shape[0]
  x_hat = (rows - mean) * inv_std
  dbias, dscale = staged_sums(g, g * x_hat)  # dL/dbeta = sum(dy), dL/dgamma = sum(dy * x_hat)
  # dL/dx = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)), plus the paths through the
  # returned mean and var when they are differentiated (in training they only feed the running
  # averages, and their cotangents are symbolic zeros).
  dx = (scale * inv_std) * (g - dbias / m - x_hat * (dscale / m))
  if not isinstance(dmean, SymbolicZero):
    dx = dx + dmean / m
  if not isinstance(dvar, SymbolicZero):
    dx = dx + dvar * (2.0 / m) * (rows - mean)
  return (
    dx.reshape(x.shape).astype(x.dtype),
    dscale.astype(scale.dtype),
    dbias.astype(bias_like.dtype),
  )


def _forward_rule(x, scale, bias, epsilon):
  # With symbolic_zeros=True the forward rule receives its differentiable inputs wrapped.
  return _forward(x.value, scale.value, bias.value, epsilon)


batch_norm.defvjp(_forward_rule, _backward, symbolic_zeros=True)


def _covered(module: nn.BatchNorm, args, kwargs) -> bool:
  """Whether this call is a plain training-mode batch norm over the last axis."""
  if len(args) != 1 or kwargs or module.use_running_average is not False:
    return False
  x = args[0]
  return (
    not module.is_initializing()
    and module.axis in (-1, x.ndim - 1)
    and module.axis_name is None
    and module.use_fast_variance
    and module.force_float32_reductions
    and jnp.issubdtype(x.dtype, jnp.floating)
  )


def _staged_batch_norm_call(next_fun, args, kwargs, context):
  module = context.module
  if not (
    isinstance(module, nn.BatchNorm)
    and context.method_name == '__call__'
    and _covered(module, args, kwargs)
  ):
    return next_fun(*args, **kwargs)
  x = args[0]
  features = (x.shape[-1],)
  # The variables of flax.linen.BatchNorm: same collections, names, shapes and initialisers.
  ra_mean = module.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
  ra_var = module.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
  params = []
  scale, bias = jnp.ones(features, jnp.float32), jnp.zeros(features, jnp.float32)
  if module.use_scale:
    scale = module.param('scale', module.scale_init, features, module.param_dtype)
    params.append(scale)
  if module.use_bias:
    bias = module.param('bias', module.bias_init, features, module.param_dtype)
    params.append(bias)
  y, mean, var = batch_norm(x, scale, bias, module.epsilon)
  ra_mean.value = module.momentum * ra_mean.value + (1 - module.momentum) * mean
  ra_var.value = module.momentum * ra_var.value + (1 - module.momentum) * var
  return y.astype(module.dtype or jnp.result_type(x, *params))


def batch_norm_staged(enabled: bool = True) -> contextlib.AbstractContextManager:
  """While tracing inside this context, training-mode `nn.BatchNorm` calls use `batch_norm`."""
  return nn.intercept_methods(_staged_batch_norm_call) if enabled else contextlib.nullcontext()
