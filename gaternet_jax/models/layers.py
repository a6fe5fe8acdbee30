"""Building blocks shared by the backbones: convolutions, batch norm, SE, gating, unit specs."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax import configs
from gaternet_jax.gating.local import LocalGates
from gaternet_jax.layout import GatedLayer
from gaternet_jax.models import pruning as pruning_lib
from gaternet_jax.models.pruning import PrunedLayer, Pruning

Dtype = Any


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """Static description of one residual unit, shared by the module and its gate layout."""

  name: str
  in_channels: int
  mid_channels: int
  out_channels: int
  stride: int
  out_size: tuple[int, int]  # spatial size of the unit's output


def ceil_div(a: int, b: int) -> int:
  """ceil(a / b) for positive ints: the output size of a 'SAME' convolution of stride b."""
  return -(-a // b)


def units_gate_layout(
  specs: list[UnitSpec], last_kernel_area: int, pruning: Pruning | None = None
) -> list[GatedLayer]:
  """Gated layers of residual units gated on their last convolution (kernel area x mid channels
  x output positions MACs per filter); under an export's `pruning`, only the input-dependent
  filters, and no layer left without one."""
  plan = dict(pruning or ())
  layout = []
  for s in specs:
    filters = pruning_lib.gate_width(plan.get(s.name), s.out_channels)
    if filters:
      macs = last_kernel_area * s.mid_channels * s.out_size[0] * s.out_size[1]
      layout.append(GatedLayer(s.name, filters, macs))
  return layout


GATE_PLACEMENTS = ('last', 'first')


def first_conv_gate_layout(
  specs: list[UnitSpec], *, bottleneck: bool, pruning: Pruning | None = None
) -> list[GatedLayer]:
  """Gated layers of units gated on their FIRST convolution (local gating, Batch-Shaping).

  An off filter of the first convolution saves that filter and, its channel being zero, the
  second convolution's work on that input channel: basic units, 3x3 (stride s) then 3x3 (out
  channels); bottleneck units, 1x1 at the input's resolution then 3x3 (stride s, mid channels).
  Under an export's `pruning`, only the input-dependent filters, and no layer left without one.
  """
  plan = dict(pruning or ())
  layout = []
  in_size = specs[0].out_size if specs else (0, 0)  # the first unit has stride 1
  for s in specs:
    out_positions = s.out_size[0] * s.out_size[1]
    if bottleneck:
      macs = s.in_channels * in_size[0] * in_size[1] + 9 * s.mid_channels * out_positions
    else:
      macs = 9 * s.in_channels * out_positions + 9 * s.out_channels * out_positions
    filters = pruning_lib.gate_width(plan.get(s.name), s.mid_channels)
    if filters:
      layout.append(GatedLayer(s.name, filters, macs))
    in_size = s.out_size
  return layout


def gate_layout_for(
  specs: list[UnitSpec], placement: str, *, bottleneck: bool, pruning: Pruning | None
) -> list[GatedLayer]:
  """A ResNet's gate layout: its units' last convolutions (GaterNet) or first (local gating).

  An export's `pruning` plans the gated convolution: the last one, or the first one.
  """
  if placement == 'first':
    return first_conv_gate_layout(specs, bottleneck=bottleneck, pruning=pruning)
  if placement != 'last':
    raise ValueError(f'gate_placement must be one of {GATE_PLACEMENTS}, got {placement!r}')
  return units_gate_layout(specs, 1 if bottleneck else 9, pruning)


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
#   `model.strided_padding` existed used it (configs.LEGACY_VALUES), and keep it.
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


def gated_units(
  x, specs, gates, make_unit, *, train: bool, pruning: Pruning | None = None, skip_in=None
):
  """Applies one residual unit per spec in order, each with its slice of the gate vector.

  Args:
    x: the stem's output.
    specs: the backbone's unit specs (the same list its gate layout is built from).
    gates: (batch, c) gate vector, None for the plain network, or a `LocalGates` (local gating:
      every unit computes its own gates from its input and records them there).
    make_unit: (spec, name, pruned) -> the unit module; called here so it binds to the calling
      module. `pruned` is the unit's PrunedLayer under an export's plan, else None.
    train: training mode.
    pruning: an export's plan (models/pruning.py), or None.
    skip_in: the calling backbone module, to skip off units (`skip_if_all_off`) in evaluation;
      None computes every unit.
  """
  plan = dict(pruning or ())
  if isinstance(gates, LocalGates):
    for spec in specs:
      unit = make_unit(spec, spec.name.replace('/', '_'), plan.get(spec.name))
      x = unit(x, gates, train=train)
    return x
  skip = skip_in is not None and not train and not skip_in.is_initializing()
  widths = [pruning_lib.gate_width(plan.get(s.name), s.out_channels) for s in specs]
  slicer = GateSlicer(gates, sum(widths))
  for spec, width in zip(specs, widths):
    name, pruned = spec.name.replace('/', '_'), plan.get(spec.name)
    gate = slicer.next(width) if width else None
    if skip and gate is not None and pruning_lib.every_kept_gated(pruned):
      x = skip_if_all_off(skip_in, x, gate, lambda p, s=spec, n=name: make_unit(s, n, p), pruned)
    else:
      x = make_unit(spec, name, pruned)(x, gate, train=train)
  slicer.check_consumed()
  return x


def skip_if_all_off(parent: nn.Module, x, gate, make_unit, pruned: PrunedLayer | None):
  """One GaterNet unit in evaluation, computed only if one of its gates is on in the batch.

  With every gate of the unit at 0, eq. 4 makes every gated output 0, so the unit is exactly
  its version with every filter removed (`make_unit(PrunedLayer((), ()))`: the shortcut, and
  the ReLU after the addition where the unit has one), which needs none of its convolutions.
  `lax.cond` (`nn.cond`) runs only the branch taken; at batch 1 a unit whose gates the image
  left off costs nothing but the test. Only for units whose every computed filter is gated
  (under an export's plan: no always-on filter kept).
  """

  def computed(module, x, gate):
    del module  # the units bind to it through the call stack
    return make_unit(pruned)(x, gate, train=False)

  def skipped(module, x, gate):
    del module, gate
    return make_unit(PrunedLayer((), ()))(x, None, train=False)

  return nn.cond(jnp.any(gate > 0), computed, skipped, parent, x, gate)


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


def pool_and_classify(x, *, include_head: bool, num_classes: int, dtype: Dtype) -> jax.Array:
  """Global average pooling, then the classifier (float32 logits), or the pooled features."""
  x = jnp.mean(x, axis=(1, 2))
  if not include_head:
    return x
  return nn.Dense(num_classes, dtype=dtype, name='head')(x).astype(jnp.float32)


class BasicUnit(nn.Module):
  """Post-activation basic block (two 3x3 convolutions), gated on its second conv's output.

  Attributes:
    mid, out: channels of the first and second convolution.
    stride: of the first convolution.
    se_reduction: squeeze-and-excitation ratio; 0 disables SE.
    projection: where the shape changes, a 1x1 conv + BN shortcut (option B, ImageNet ResNets);
      otherwise subsample and zero-pad channels (option A, the parameter-free shortcut of the
      CIFAR ResNets).
    pruned: an export's plan for the gated convolution's filters (None: all computed): conv2's
      (GaterNet; with none kept the unit is its shortcut) or conv1's (`gate_first`).
    gate_first: the unit is gated on conv1 (local gating) rather than conv2.
    strided_padding: how the strided 3x3 convolution pads (STRIDED_PADDINGS).

  `gate` is conv2's slice of the gate vector (GaterNet), None, or a `LocalGates` (conv1's
  channels gated from the unit's input, Batch-Shaping).
  """

  mid: int
  out: int
  stride: int
  se_reduction: int
  projection: bool
  dtype: Dtype = jnp.float32
  pruned: PrunedLayer | None = None
  gate_first: bool = False
  strided_padding: str = 'symmetric'

  @nn.compact
  def __call__(self, x, gate, *, train):
    gate, local = split_gate(gate)
    first, last = plans_by_conv(self.pruned, self.gate_first)
    shortcut = self._shortcut(x, train)
    features = gated_features(self.out, last, self.se_reduction)
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

  def _shortcut(self, x, train):
    if self.stride == 1 and x.shape[-1] == self.out:
      return x
    if self.projection:
      x = conv(self.out, 1, self.stride, dtype=self.dtype, name='proj_conv')(x)
      return batch_norm(train, dtype=self.dtype, name='proj_bn')(x)
    x = x[:, :: self.stride, :: self.stride, :]
    extra = self.out - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
