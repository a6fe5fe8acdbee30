"""Building blocks shared by the backbones: convolutions, batch norm, SE, gating, the fields and
head every backbone has, and the parts of a residual unit (units.py runs them in order)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax import configs
from gaternet_jax.gating.local import LocalGates
from gaternet_jax.models import pruning as pruning_lib
from gaternet_jax.models.pruning import PrunedLayer

Dtype = Any


def ceil_div(a: int, b: int) -> int:
  """ceil(a / b) for positive ints: the output size of a 'SAME' convolution of stride b."""
  return -(-a // b)


# He-normal (fan_out) is what the ResNet papers and torchvision use for convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# How a convolution with a kernel larger than 1x1 pads its input (the output size is 'SAME''s,
# ceil(size / stride), either way):
# - 'symmetric': (k - 1) // 2 on every side, as the original implementations (He et al.'s Torch
#   ResNets, torchvision, Gastaldi's Shake-Shake). A stride-s convolution's outputs are then
#   centred on the pixels s*i, the ones its unit's shortcut takes (x[::s, ::s], or a 1x1 stride-s
#   projection), so a branch and its shortcut see the same pixels.
# - 'same': TensorFlow's SAME, which pads an even-sized input's strided 3x3 by (0, 1) and a
#   224-pixel 7x7/2 stem by (2, 3): outputs centred one pixel off the shortcut. Runs saved before
#   `model.strided_padding` existed used it (legacy.LEGACY_VALUES), and keep it.
# At stride 1 (and on odd sizes) the two coincide.
STRIDED_PADDINGS = configs.STRIDED_PADDINGS


def padding_for(kernel: int, padding: str) -> str | tuple[tuple[int, int], tuple[int, int]]:
  """lax padding of a square `kernel`'s convolution or pool under `padding` (STRIDED_PADDINGS)."""
  if padding not in STRIDED_PADDINGS:
    raise ValueError(f'strided padding must be one of {STRIDED_PADDINGS}, got {padding!r}')
  if kernel == 1:
    return 'VALID'
  if padding == 'same':
    return 'SAME'
  if kernel % 2 == 0:
    raise ValueError(f'symmetric padding needs an odd kernel, got {kernel}')
  half = (kernel - 1) // 2
  return ((half, half), (half, half))


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  *,
  dtype: Dtype,
  name: str | None = None,
  padding: str = 'symmetric',
):
  """A bias-free convolution with 'SAME''s output size (every conv here is followed by batch
  norm); `padding` is one of STRIDED_PADDINGS."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding_for(kernel, padding),
    use_bias=False,
    kernel_init=conv_kernel_init,
    dtype=dtype,
    name=name,
  )


def batch_norm(
  train: bool, *, dtype: Dtype, scale_init=nn.initializers.ones, gated: bool = False, name=None
):
  """Batch norm with the usual ResNet settings; statistics and parameters stay float32.

  `gated`: a `GatedBatchNorm`, called as `(x, gate)`.
  """
  return (GatedBatchNorm if gated else nn.BatchNorm)(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=scale_init,
    name=name,
  )


def scaled_channels(base: int, width: float) -> int:
  """Channels of a widened layer: round(base * width), at least 1."""
  return max(1, int(round(base * width)))


def repeats_of(depth: int, per_repeat: int, fixed: int, kind: str) -> int:
  """n of a backbone whose depth is per_repeat x n + fixed (n >= 1); otherwise a ValueError that
  `depth` is not a valid `kind`."""
  if (depth - fixed) % per_repeat or depth < fixed + per_repeat:
    raise ValueError(f'depth {depth} is not a valid {kind}')
  return (depth - fixed) // per_repeat


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation (Hu et al. 2018): rescales channels by a gated global summary."""

  reduction: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    hidden = max(1, channels // self.reduction)
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(hidden, dtype=self.dtype, name='reduce')(s))
    s = nn.sigmoid(nn.Dense(channels, dtype=self.dtype, name='expand')(s))
    return x * s[:, None, None, :].astype(x.dtype)


def apply_gate(y: jax.Array, gate: jax.Array | None) -> jax.Array:
  """Paper eq. 4: O_i = phi(F_i * I) * g_i, per sample and output channel.

  Args:
    y: a gated layer's output, (batch, H, W, C).
    gate: this layer's slice of the gate vector, (batch, C), or None for the plain network.
  """
  if gate is None:
    return y
  return y * gate[:, None, None, :].astype(y.dtype)


class GatedBatchNorm(nn.BatchNorm):
  """Batch norm whose output eq. 4's gates multiply: BN(x) * gate, gate (batch, C).

  The variables are `nn.BatchNorm`'s (a checkpoint cannot tell the two apart). The pair is one
  module so that the CPU train step can run it as one operation whose backward pass takes the
  gates' and the batch norm's sums in one read of the gradient (models/staged_batch_norm.py).
  """

  @nn.compact
  def __call__(self, x, gate):
    return apply_gate(super().__call__(x), gate)


def normalize_and_gate(y, gate, pruned: PrunedLayer | None, *, se_reduction, train, dtype, name):
  """A gated layer's tail: batch norm `name`, squeeze-and-excitation ('se') if any, then eq. 4's
  gate (on the kept channels under an export's plan). Without SE or a plan, batch norm and gate
  are one `GatedBatchNorm`."""
  if gate is None or se_reduction or pruned is not None:
    y = batch_norm(train, dtype=dtype, name=name)(y)
    if se_reduction:
      y = SqueezeExcite(se_reduction, dtype=dtype, name='se')(y)
    return gate_kept_channels(y, gate, pruned)
  return batch_norm(train, dtype=dtype, gated=True, name=name)(y, gate)


class GateSlicer:
  """Hands out consecutive slices of the gate vector, one per gated layer, in layout order.

  The backbones call `next(width)` once per gated layer as they build themselves, and check at the
  end that the whole vector was used, so a layout and the module can never disagree silently.
  """

  def __init__(self, gates: jax.Array | None, expected: int):
    if gates is not None and gates.shape[-1] != expected:
      raise ValueError(
        f'gate vector has {gates.shape[-1]} entries but the backbone gates {expected} filters'
      )
    self._gates = gates
    self._offset = 0

  def next(self, width: int) -> jax.Array | None:
    if self._gates is None:
      return None
    gate = self._gates[:, self._offset : self._offset + width]
    self._offset += width
    return gate

  def check_consumed(self) -> None:
    if self._gates is not None and self._offset != self._gates.shape[-1]:
      raise ValueError(
        f'gate vector has {self._gates.shape[-1]} entries but the backbone gates {self._offset}'
        ' filters'
      )


def split_gate(gate):
  """(the unit's last-conv gate or None, the LocalGates or None) from a unit's `gate` argument."""
  if isinstance(gate, LocalGates):
    return None, gate
  return gate, None


def gate_first_conv(y, x, local: LocalGates | None, pruned: PrunedLayer | None = None):
  """Local gating: the first convolution's activated output y times the gates the unit's
  gating module computes from the unit's input x (binary gates commute with the ReLU).

  Under an export's plan for the first convolution (`pruned`), y holds the kept channels and the
  gating module produces only the input-dependent ones' gates (none: no gating module at all).
  """
  if local is None:
    return y
  if pruned is None:
    return apply_gate(y, local.gate(x, y.shape[-1]))
  if not pruned.gated:
    return y
  return pruning_lib.apply_kept_gates(y, local.gate(x, len(pruned.gated)), pruned)


def plans_by_conv(pruned: PrunedLayer | None, gate_first: bool):
  """(the plan of the first convolution, the plan of the last) from a unit's one plan."""
  return (pruned, None) if gate_first else (None, pruned)


def first_conv_pair(
  inputs, x, local: LocalGates | None, first: PrunedLayer | None, *, mid: int, kernel1: int,
  stride1: int, out2: int, kernel2: int, stride2: int, bn1: str, train: bool, dtype: Dtype,
  padding: str,
):  # fmt: skip
  """A residual unit's first two convolutions: conv1 (`mid` filters, or the plan's kept ones) on
  `inputs` -> batch norm `bn1` -> ReLU -> local gates (read from the unit's input `x`) -> conv2
  (`out2` filters), both padded by `padding` (STRIDED_PADDINGS). Parameters are the calling
  unit's ('conv1', `bn1`, 'conv2').

  A plan that removed every conv1 filter leaves zeros of conv2's output shape: what a bias-free
  'SAME' convolution computes from an all-zero input, exactly what the gated model computed with
  all those gates off.
  """
  width = mid if first is None else len(first.kept)
  if not width:
    stride = stride1 * stride2
    n, h, w = x.shape[0], ceil_div(x.shape[1], stride), ceil_div(x.shape[2], stride)
    return jnp.zeros((n, h, w, out2), dtype)
  y = conv(width, kernel1, stride1, dtype=dtype, name='conv1', padding=padding)(inputs)
  y = nn.relu(batch_norm(train, dtype=dtype, name=bn1)(y))
  y = gate_first_conv(y, x, local, first)
  return conv(out2, kernel2, stride2, dtype=dtype, name='conv2', padding=padding)(y)


def gate_kept_channels(y, gate, pruned: PrunedLayer | None):
  """Eq. 4 on a gated layer's output, pruned or not."""
  if pruned is None:
    return apply_gate(y, gate)
  return pruning_lib.apply_kept_gates(y, gate, pruned)


def gated_features(out: int, pruned: PrunedLayer | None, se_reduction: int) -> int:
  """Output channels the gated convolution computes: all, or the plan's kept ones."""
  if pruned is None:
    return out
  if se_reduction and pruned.kept:
    # SE mixes every channel (removed ones included) before the gate: no exact export exists.
    # (With none kept there is nothing to mix: the unit is its shortcut, as when skipped.)
    raise ValueError('a pruned unit cannot use squeeze-and-excitation')
  return len(pruned.kept)


def keyword(default):
  """A module field whose default makes it keyword-only, so that a subclass's own fields without
  one (`depth`, ...) still come first."""
  return dataclasses.field(default=default, kw_only=True)


class Backbone(nn.Module):
  """The fields every backbone takes from `models.create_backbone` (keyword-only), and its head.

  Attributes:
    num_classes: classifier outputs; ignored when `include_head` is False.
    width: multiplies every layer's channel count (round, at least 1; the -Wider variants).
    se_reduction: squeeze-and-excitation reduction ratio in every unit; 0 disables SE.
    include_head: False drops the classifier and returns pooled features (a gater's extractor).
    dtype: computation dtype (parameters and batch statistics stay float32).
  """

  num_classes: int = keyword(10)
  width: float = keyword(1.0)
  se_reduction: int = keyword(0)
  include_head: bool = keyword(True)
  dtype: Dtype = keyword(jnp.float32)

  def _pool_and_classify(self, x) -> jax.Array:
    """Global average pooling, then the classifier ('head', float32 logits), or the pooled
    features."""
    x = jnp.mean(x, axis=(1, 2))
    if not self.include_head:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


class NoSEBackbone(Backbone):
  """A backbone with no -SE variant (Table 2's): a nonzero `se_reduction` is refused at
  construction, so that describe/train fail before any tracing."""

  ARCHITECTURE = 'this backbone'  # its name in the refusal

  def __post_init__(self):
    if self.se_reduction:
      raise ValueError(f'{self.ARCHITECTURE} has no -SE variant')
    super().__post_init__()


class ResidualUnit(nn.Module):
  """The fields and parts every ResNet unit has (`BasicUnit`, resnet.BottleneckUnit,
  resnet_cifar.PreActBottleneckUnit).

  Attributes:
    mid, out: channels of the inner convolutions and of the unit's output.
    stride: of the unit's first 3x3 convolution.
    se_reduction: squeeze-and-excitation ratio; 0 disables SE.
    pruned: an export's plan for the gated convolution's filters (None: all computed): the last
      convolution's (GaterNet; with none kept the unit is its shortcut) or conv1's (`gate_first`).
    gate_first: the unit is gated on conv1 (local gating) rather than its last convolution.
    strided_padding: how the strided 3x3 convolution pads (STRIDED_PADDINGS).

  A unit is called as `(x, gate, train=...)`: `gate` is the last convolution's slice of the gate
  vector (GaterNet), None, or a `LocalGates` (conv1's channels gated from the unit's input,
  Batch-Shaping).
  """

  mid: int
  out: int
  stride: int
  se_reduction: int
  dtype: Dtype = jnp.float32
  pruned: PrunedLayer | None = None
  gate_first: bool = False
  strided_padding: str = 'symmetric'

  def _plans(self, gate):
    """(the last convolution's gate, the LocalGates, conv1's plan, the last convolution's plan,
    the last convolution's computed filters) from the unit's `gate` argument and `pruned`."""
    gate, local = split_gate(gate)
    first, last = plans_by_conv(self.pruned, self.gate_first)
    return gate, local, first, last, gated_features(self.out, last, self.se_reduction)

  def _shortcut(self, x, train, projection: bool = True):
    """The input where the shape stays; where it changes, a 1x1 conv + BN (option B), or without
    `projection` the input subsampled with its channels zero-padded (option A)."""
    if self.stride == 1 and x.shape[-1] == self.out:
      return x
    if projection:
      x = conv(self.out, 1, self.stride, dtype=self.dtype, name='proj_conv')(x)
      return batch_norm(train, dtype=self.dtype, name='proj_bn')(x)
    x = x[:, :: self.stride, :: self.stride, :]
    extra = self.out - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))

  def _bottleneck_convs(self, inputs, x, local, first, features, *, bns, train):
    """A bottleneck's convolutions: 1x1 conv1 (mid) on `inputs`, batch norm `bns[0]`, ReLU, local
    gates (from the unit's input x), 3x3 conv2 (mid, the stride), batch norm `bns[1]`, ReLU, 1x1
    conv3 (`features`)."""
    y = first_conv_pair(
      inputs, x, local, first, mid=self.mid, kernel1=1, stride1=1, out2=self.mid, kernel2=3,
      stride2=self.stride, bn1=bns[0], train=train, dtype=self.dtype,
      padding=self.strided_padding,
    )  # fmt: skip
    y = nn.relu(batch_norm(train, dtype=self.dtype, name=bns[1])(y))
    return conv(features, 1, dtype=self.dtype, name='conv3')(y)


class BasicUnit(ResidualUnit):
  """Post-activation basic block (two 3x3 convolutions: mid channels with the stride, then out
  channels), gated on its second conv's output (conv1's under `gate_first`).

  Attributes (besides `ResidualUnit`'s):
    projection (keyword-only): where the shape changes, a 1x1 conv + BN shortcut (option B,
      ImageNet ResNets); otherwise subsample and zero-pad channels (option A, the parameter-free
      shortcut of the CIFAR ResNets).
  """

  projection: bool = dataclasses.field(kw_only=True)

  @nn.compact
  def __call__(self, x, gate, *, train):
    gate, local, first, last, features = self._plans(gate)
    shortcut = self._shortcut(x, train, self.projection)
    if not features:
      return nn.relu(shortcut)
    y = first_conv_pair(
      x, x, local, first, mid=self.mid, kernel1=3, stride1=self.stride, out2=features,
      kernel2=3, stride2=1, bn1='bn1', train=train, dtype=self.dtype,
      padding=self.strided_padding,
    )  # fmt: skip
    y = normalize_and_gate(
      y, gate, last, se_reduction=self.se_reduction, train=train, dtype=self.dtype, name='bn2'
    )
    return nn.relu(pruning_lib.add_to_shortcut(shortcut, y, last))
