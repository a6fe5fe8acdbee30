"""Training-mode batch norm with its sums over the batch taken in two stages (for XLA:CPU).

Batch norm over x[M, C] (M = batch x height x width rows, C channels) needs per-channel sums over
the M rows: sum(x) and sum(x^2) forward, sum(dy) and sum(dy * x_hat) backward. XLA:CPU rewrites
each such long reduction into a `reduce-window` that cannot fuse with the element-wise op that
feeds it, so x^2 or dy * x_hat is first written out in full and read back, and the window runs
over only a few output rows. For ResNet-20's [128, 32, 32, 16] activations sum(x) and sum(x^2)
take 2.1-2.2 ms that way on the 2-core CPU, 0.17 ms as below.

Here each sum is taken in two stages: first over groups of `GROUP_ROWS` consecutive rows
([M, C] -> [M / 16, C]), a short reduction that XLA:CPU fuses with its producer and splits across
threads, then over the partial sums, which are small (each stage one variadic reduce for all the
sums of one shape). An `optimization_barrier` between the stages keeps XLA's simplifier from
merging them back into one long reduction; it survives only with the CPU XLA flags
(`flags.CPU_XLA_FLAGS`), and without them the result is the usual program. A custom VJP
gives the backward pass the same staged sums (autodiff would emit long reductions).

`gated_batch_norm` is batch norm and eq. 4's gate (`layers.GatedBatchNorm`, a GaterNet's gated
layer) as one operation, whose backward pass takes the gates' sums and batch norm's together.

`batch_norm_staged()` swaps these computations into `flax.linen.BatchNorm` (and
`GatedBatchNorm`) while tracing: the same variables, equations and running-average update; only
the order of summation differs (float rounding). Calls it does not cover (evaluation,
initialisation, masks, named axes, a feature axis other than the last) run Flax's own code; a
`GatedBatchNorm` call it does not cover (evaluation, a gate not of shape (batch, C)) runs its
own, whose batch norm is again one of these calls.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from gaternet_jax.models.layers import GatedBatchNorm, apply_gate

# Rows per first-stage partial sum. Sum and sum of squares of [128, 32, 32, 16] on the 2-core CPU:
# groups of 8 rows 0.20-0.21 ms, 16 rows 0.17-0.18 ms, 32 rows 0.18-0.19 ms. A third stage (sums of
# groups of partial sums, again behind a barrier) gained nothing in the ResNet-20 train step and
# adds compile time.
GROUP_ROWS = 16


def _sum_axis(arrays, axis: int) -> tuple[jax.Array, ...]:
  """sum(a, axis) for each of `arrays`, as one variadic reduce when they have one shape.

  XLA:CPU fuses one reduce per output: separate sums of dy and dy * x_hat read dy (and its
  producers) twice, one variadic reduce reads it once. The gated ResNet-20 train step ran 4%
  faster this way (394.3 -> 410.1 images/s, in-process A/B, 8 rounds, the 2-core development CPU).
  """
  if len({(a.shape, a.dtype) for a in arrays}) > 1:
    return tuple(a.sum(axis=axis) for a in arrays)
  zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
  return tuple(
    jax.lax.reduce(tuple(arrays), zeros, lambda u, v: tuple(a + b for a, b in zip(u, v)), (axis,))
  )


def _group_sums(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Each rows[M, C] -> [ceil(M / GROUP_ROWS), C]: sums of consecutive groups of GROUP_ROWS rows."""
  m = arrays[0].shape[0]
  width = min(GROUP_ROWS, m)
  whole = m - m % width
  partials = _sum_axis([a[:whole].reshape(whole // width, width, -1) for a in arrays], 1)
  if whole < m:  # the last m % width rows join the first group
    partials = tuple(p.at[0].add(a[whole:].sum(axis=0)) for p, a in zip(partials, arrays))
  return partials


def staged_sums(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """sum(a, axis=0) for each a[M, C], in two stages with one barrier between them.

  Both stages are variadic reduces (`_sum_axis`). Separate sums in the second stage, over
  M / 16 partial sums (8,192 rows in ResNet-20's first stage), are long single-output
  reductions again, which XLA:CPU rewrote into chains of reduce-windows: 5-7 kernels per pair of
  sums instead of 1, 1,952 of the 4,428 fusions of ResNet-164-Gated's train step, and 2.1-2.6 s
  of its cold compile (in-process A/B; docs/performance.md). The running time did not change.
  """
  partials = jax.lax.optimization_barrier(_group_sums(*arrays))
  return _sum_axis(partials, 0)


def _sample_group_width(positions: int) -> int:
  """The largest group of consecutive positions, at most GROUP_ROWS, that divides `positions`."""
  return max(w for w in range(1, min(GROUP_ROWS, positions) + 1) if positions % w == 0)


def staged_sums_per_sample(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """sum(a, axis=1) for each a[N, P, C] (a sample's P positions), staged as `staged_sums`: groups
  of consecutive positions within one sample, a barrier, then the groups of each sample."""
  n, positions, c = arrays[0].shape
  w = _sample_group_width(positions)
  if w == 1:  # e.g. 17 x 17 pixels: no groups to stage (a barrier would only copy the arrays)
    return _sum_axis(arrays, 1)
  partials = jax.lax.optimization_barrier(
    tuple(_sum_axis([a.reshape(n, positions // w, w, c) for a in arrays], 2))
  )
  return _sum_axis(partials, 1)


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _normalize(x, scale, bias, epsilon):
  """(y rows, mean, var, 1 / sqrt(var + epsilon)) of batch norm over x's rows, all float32."""
  rows = _rows(x)
  m = rows.shape[0]
  total, total_sq = staged_sums(rows, rows * rows)
  mean = total / m
  # Flax's fast variance, E[x^2] - E[x]^2, clipped at 0 because the difference can round below.
  var = jnp.maximum(0.0, total_sq / m - mean * mean)
  inv_std = jax.lax.rsqrt(var + epsilon)
  return (rows - mean) * (inv_std * scale) + bias, mean, var, inv_std


def _input_gradient(dy, x_hat, rows, mean, inv_std, scale, dbias, dscale, dmean, dvar):
  """dL/dx rows from dL/dy rows `dy`, with dbias = sum(dy) and dscale = sum(dy * x_hat).

  dL/dx = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)), plus the paths through the
  returned mean and var when they are differentiated (in training they only feed the running
  averages, and their cotangents are symbolic zeros).
  """
  m = rows.shape[0]
  dx = (scale * inv_std) * (dy - dbias / m - x_hat * (dscale / m))
  if not isinstance(dmean, SymbolicZero):
    dx = dx + dmean / m
  if not isinstance(dvar, SymbolicZero):
    dx = dx + dvar * (2.0 / m) * (rows - mean)
  return dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x, scale, bias, epsilon):
  """(y, mean, var): y = (x - mean) / sqrt(var + epsilon) * scale + bias over all but x's last
  axis; y, mean and var are float32 (the caller casts y)."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  y, mean, var, inv_std = _normalize(x, scale, bias, epsilon)
  # A scalar carries bias's dtype to the backward pass (its cotangent must have it).
  return (y.reshape(x.shape), mean, var), (x, mean, inv_std, scale, jnp.zeros((), bias.dtype))


def _backward(epsilon, residuals, cotangents):
  del epsilon  # inv_std holds it
  x, mean, inv_std, scale, bias_like = residuals
  dy, dmean, dvar = cotangents
  rows, g = _rows(x), _rows(dy)
  x_hat = (rows - mean) * inv_std
  dbias, dscale = staged_sums(g, g * x_hat)  # dL/dbeta = sum(dy), dL/dgamma = sum(dy * x_hat)
  dx = _input_gradient(g, x_hat, rows, mean, inv_std, scale, dbias, dscale, dmean, dvar)
  return (
    dx.reshape(x.shape).astype(x.dtype),
    dscale.astype(scale.dtype),
    dbias.astype(bias_like.dtype),
  )


def _forward_rule(x, scale, bias, epsilon):
  # With symbolic_zeros=True the forward rule receives its differentiable inputs wrapped.
  return _forward(x.value, scale.value, bias.value, epsilon)


batch_norm.defvjp(_forward_rule, _backward, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gated_batch_norm(x, scale, bias, gate, epsilon):
  """(y * gate, mean, var): `batch_norm`'s y times eq. 4's gates, gate[N, C] per sample and channel
  (x[N, H, W, C]); float32 like `batch_norm`.

  The backward pass needs two sums of the output gradient t per sample and channel, over the
  sample's positions: S0 = sum(t) and S1 = sum(t * x_hat). They give both the gates' gradient,
  sum(t * y) = gamma * S1 + beta * S0 (y = x_hat * gamma + beta), and batch norm's, whose output
  gradient is dy = t * gate: sum(dy) = sum_n gate * S0, sum(dy * x_hat) = sum_n gate * S1. One
  read of t and x gives all of them; autodiff of batch norm and then the product reads t twice
  and keeps y for the gates' sum. The gated ResNet-20 train step: 398.9 -> 431.5 images/s
  (in-process A/B, 8 rounds, the 2-core development CPU).
  """
  return _gated_forward(x, scale, bias, gate, epsilon)[0]


def _gated_forward(x, scale, bias, gate, epsilon):
  y, mean, var, inv_std = _normalize(x, scale, bias, epsilon)
  return (apply_gate(y.reshape(x.shape), gate), mean, var), (x, mean, inv_std, scale, bias, gate)


def _gated_backward(epsilon, residuals, cotangents):
  del epsilon  # inv_std holds it
  x, mean, inv_std, scale, bias, gate = residuals
  dout, dmean, dvar = cotangents
  n, c = gate.shape
  rows, t = _rows(x), _rows(dout)
  x_hat = (rows - mean) * inv_std
  s0, s1 = staged_sums_per_sample(t.reshape(n, -1, c), (t * x_hat).reshape(n, -1, c))
  g = gate.astype(jnp.float32)
  dgate = scale * s1 + bias * s0
  dbias, dscale = jnp.sum(g * s0, axis=0), jnp.sum(g * s1, axis=0)
  dy = _rows(apply_gate(dout.astype(jnp.float32), gate))
  dx = _input_gradient(dy, x_hat, rows, mean, inv_std, scale, dbias, dscale, dmean, dvar)
  return (
    dx.reshape(x.shape).astype(x.dtype),
    dscale.astype(scale.dtype),
    dbias.astype(bias.dtype),
    dgate.astype(gate.dtype),
  )


def _gated_forward_rule(x, scale, bias, gate, epsilon):
  return _gated_forward(x.value, scale.value, bias.value, gate.value, epsilon)


gated_batch_norm.defvjp(_gated_forward_rule, _gated_backward, symbolic_zeros=True)


def _covered(module: nn.BatchNorm, args, kwargs) -> bool:
  """Whether this call is a plain training-mode batch norm over the last axis: `(x)`, or a
  `GatedBatchNorm`'s `(x, gate)`, x (batch, H, W, C) and gate (batch, C)."""
  if len(args) not in (1, 2) or kwargs or module.use_running_average is not False:
    return False
  x = args[0]
  if len(args) == 2 and not (
    isinstance(module, GatedBatchNorm)
    and x.ndim == 4
    and getattr(args[1], 'shape', None) == (x.shape[0], x.shape[-1])
    and jnp.issubdtype(args[1].dtype, jnp.floating)
  ):
    return False
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
  if len(args) == 2:  # a GatedBatchNorm's (x, gate)
    y, mean, var = gated_batch_norm(x, scale, bias, args[1], module.epsilon)
  else:
    y, mean, var = batch_norm(x, scale, bias, module.epsilon)
  ra_mean.value = module.momentum * ra_mean.value + (1 - module.momentum) * mean
  ra_var.value = module.momentum * ra_var.value + (1 - module.momentum) * var
  return y.astype(module.dtype or jnp.result_type(x, *params))


def batch_norm_staged(enabled: bool = True) -> contextlib.AbstractContextManager:
  """While tracing inside this context, training-mode `nn.BatchNorm` calls use `batch_norm`."""
  return nn.intercept_methods(_staged_batch_norm_call) if enabled else contextlib.nullcontext()
