"""Convolutions in native CPU kernels (`native/conv_*.cc`), for XLA:CPU.

For y = conv(x, w) (NHWC, HWIO), with dy the cotangent of y, three kernels:

- forward:         y;
- input gradient:  dx, the transposed convolution of dy (any stride);
- weight gradient: dw = sum over the batch and output pixels of x patches times dy.

Why: XLA:CPU's Eigen convolutions run ResNet-20's 3x3 convolutions (16-64 channels, batch 128)
1.3-1.7x slower than these kernels on the 2-core development CPU; it computes dw as a convolution
over the batch after transposing x and dy to batch-minor layouts (3.4x slower for 16 channels), and
dx of a strided convolution as a convolution over a dilated dy (docs/performance.md;
`benchmarks/conv_kernels.py`).

`native_convolutions()` swaps `conv_general_dilated` below into every `flax.linen.Conv` call while
tracing. A convolution it does not cover (not float32, not NHWC / HWIO, dilated, grouped, negative
padding) runs XLA's own, as does everything when the kernels are unavailable (`native.available()`
is False: not measured on this CPU, no compiler, or GATERNET_NATIVE_KERNELS=0). Any channel counts
are covered (an export's pruned layers, DenseNet's 12 new channels). Results agree with XLA's to
float32 rounding (sums in another order).

On a mesh of several devices each kernel runs per device on its part of the batch
(`jax.shard_map` over the mesh's axes); the weight gradient's per-device sums are added with a
`psum`, the same all-reduce XLA's data-parallel gradient does.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gaternet_jax.cpu import native

FORWARD_TARGET = 'gaternet_conv_forward'
INPUT_GRAD_TARGET = 'gaternet_conv_input_grad'
WEIGHT_GRAD_TARGET = 'gaternet_conv_weight_grad'
# flax's dimension numbers for a 2-D NHWC convolution with an HWIO kernel.
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))

Pads = tuple[tuple[int, int], tuple[int, int]]


def native_padding(
  lhs,
  rhs,
  window_strides,
  padding,
  *,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
) -> Pads | None:
  """The explicit padding when the native kernels cover this convolution, else None.

  Takes `lax.conv_general_dilated`'s arguments (precision does not matter: float32 on the CPU).
  """
  del precision
  if lhs.ndim != 4 or rhs.ndim != 4 or len(window_strides) != 2:
    return None
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return None
  if preferred_element_type not in (None, jnp.float32, np.float32):
    return None
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != NHWC:
    return None
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return None
  if feature_group_count != 1 or batch_group_count != 1:
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
    return None
  return pads  # type: ignore[return-value]


def _ffi(target: str, out_shape, *operands, strides, pads_top_left):
  if not native.available():  # registers the targets on first use
    raise RuntimeError(f'native CPU kernels unavailable: {native.unavailable_reason()}')
  return jax.ffi.ffi_call(
    target, jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32), vmap_method='sequential'
  )(
    *operands,
    stride_h=np.int64(strides[0]),
    stride_w=np.int64(strides[1]),
    pad_top=np.int64(pads_top_left[0]),
    pad_left=np.int64(pads_top_left[1]),
  )


def _per_device(mesh: Mesh | None, fn, batch_args: int, total_out: bool):
  """fn over each device's part of the batch (the first `batch_args` operands are batched, the
  rest replicated); `total_out` adds the per-device results, else the output is batched too."""
  if mesh is None or mesh.size == 1:
    return fn

  def run(*operands):
    batch = P(mesh.axis_names)
    in_specs = tuple(batch if i < batch_args else P() for i in range(len(operands)))
    body = (lambda *a: lax.psum(fn(*a), mesh.axis_names)) if total_out else fn
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P() if total_out else batch)(
      *operands
    )

  return run


def forward(x: jax.Array, w: jax.Array, strides, pads: Pads, mesh: Mesh | None = None):
  """y = conv(x, w) in the native forward kernel (x NHWC, w HWIO)."""
  _, h, width, _ = x.shape
  kh, kw, _, co = w.shape
  oh = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
  ow = (width + pads[1][0] + pads[1][1] - kw) // strides[1] + 1

  def call(x, w):  # x: this device's part of the batch
    out_shape = (x.shape[0], oh, ow, co)
    top_left = (pads[0][0], pads[1][0])
    return _ffi(FORWARD_TARGET, out_shape, x, w, strides=strides, pads_top_left=top_left)

  return _per_device(mesh, call, batch_args=1, total_out=False)(x, w)


def weight_gradient(
  x: jax.Array, dy: jax.Array, kernel_shape, strides, pads: Pads, mesh: Mesh | None = None
) -> jax.Array:
  """dw[kh, kw, ci, co] of an NHWC convolution from its input x and output cotangent dy."""

  def call(x, dy):
    return _ffi(
      WEIGHT_GRAD_TARGET,
      kernel_shape,
      x,
      dy,
      strides=strides,
      pads_top_left=(pads[0][0], pads[1][0]),
    )

  return _per_device(mesh, call, batch_args=2, total_out=True)(x, dy)


def input_gradient(
  dy: jax.Array, w: jax.Array, x_shape, strides, pads: Pads, mesh: Mesh | None = None
) -> jax.Array:
  """dx[n, h, w, ci] of an NHWC convolution from its output cotangent dy and kernel w (HWIO)."""
  swapped = jnp.swapaxes(w, 2, 3)  # [kh, kw, co, ci]: dx's channels contiguous for the kernel

  def call(dy, swapped):  # dy: this device's part of the batch
    out_shape = (dy.shape[0], *x_shape[1:])
    top_left = (pads[0][0], pads[1][0])
    return _ffi(INPUT_GRAD_TARGET, out_shape, dy, swapped, strides=strides, pads_top_left=top_left)

  return _per_device(mesh, call, batch_args=1, total_out=False)(dy, swapped)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(lhs, rhs, strides, pads, precision, mesh):
  del precision  # float32 on the CPU: the kernels compute in full float32
  return forward(lhs, rhs, strides, pads, mesh)


def _conv_fwd(lhs, rhs, strides, pads, precision, mesh):
  return _conv(lhs, rhs, strides, pads, precision, mesh), (lhs, rhs)


def _flipped_pads(w_shape, pads: Pads) -> Pads | None:
  """Padding of dy for dx = conv(dy, flipped w) at stride 1; None where it would be negative."""
  (kh, kw), ((top, bottom), (left, right)) = w_shape[:2], pads
  flipped = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
  return None if any(p < 0 for pair in flipped for p in pair) else flipped


def _conv_bwd(strides, pads, precision, mesh, residuals, dy):
  del precision
  lhs, rhs = residuals
  flipped_pads = _flipped_pads(rhs.shape, pads)
  if strides == (1, 1) and flipped_pads is not None:
    # dx[i] = sum over a of dy[i + p - a] w[a]: the forward kernel on w flipped in space with its
    # channel axes swapped, padded by k - 1 - p. For 16 channels it ran faster than the transposed
    # kernel (1.62-1.66 vs 1.91-1.97 ms, ResNet-20's first stage at batch 128), for 32 and 64 the
    # same.
    flipped = jnp.transpose(jnp.flip(rhs, (0, 1)), (0, 1, 3, 2))
    dx = forward(dy, flipped, strides, flipped_pads, mesh)
  else:
    dx = input_gradient(dy, rhs, lhs.shape, strides, pads, mesh)
  dw = weight_gradient(lhs, dy, rhs.shape, strides, pads, mesh)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, *, mesh: Mesh | None = None, **options):
  """`lax.conv_general_dilated` (its other arguments by keyword, as flax passes them), in the
  native kernels where they apply and are available."""
  pads = native_padding(lhs, rhs, window_strides, padding, **options)
  if pads is None or not native.available():
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
  strides = tuple(int(s) for s in window_strides)
  return _conv(lhs, rhs, strides, pads, options.get('precision'), mesh)


def _interceptor(mesh: Mesh | None):
  conv_fn = functools.partial(conv_general_dilated, mesh=mesh)

  def intercept(next_fun, args, kwargs, context):
    module: Any = context.module
    if (
      not isinstance(module, nn.Conv)
      or context.method_name != '__call__'
      or module.conv_general_dilated is not None
      or module.conv_general_dilated_cls is not None
    ):
      return next_fun(*args, **kwargs)
    # flax's Conv calls its `conv_general_dilated` field when one is set. The module is the bound
    # copy made for this apply, and the field is restored before anything else sees it.
    object.__setattr__(module, 'conv_general_dilated', conv_fn)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, 'conv_general_dilated', None)

  return intercept


def native_convolutions(
  enabled: bool = True, mesh: Mesh | None = None
) -> contextlib.AbstractContextManager:
  """While tracing inside this context, `nn.Conv` calls run in the native kernels where they
  apply (`enabled` and the kernels `native.available()`); `mesh` is the mesh the batch is on."""
  if not enabled or not native.available():
    return contextlib.nullcontext()
  return nn.intercept_methods(_interceptor(mesh))
