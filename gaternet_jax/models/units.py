"""Residual units as a backbone sees them: their specs, gate layouts, how they are run in order,
and the parts of a ResNet that the ImageNet (resnet.py) and CIFAR (resnet_cifar.py) ones share.

The unit modules themselves are `layers.BasicUnit`, `resnet.BottleneckUnit` and
`resnet_cifar.PreActBottleneckUnit` (their common fields: `layers.ResidualUnit`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gating.local import LocalGates
from gaternet_jax.layout import GatedLayer
from gaternet_jax.models import layers
from gaternet_jax.models import pruning as pruning_lib
from gaternet_jax.models.layers import keyword
from gaternet_jax.models.pruning import PrunedLayer, Pruning


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """Static description of one residual unit, shared by the module and its gate layout."""

  name: str
  in_channels: int
  mid_channels: int
  out_channels: int
  stride: int
  out_size: tuple[int, int]  # spatial size of the unit's output


def stage_specs(
  stages: Sequence[tuple[int, int, int]],
  in_channels: int,
  size: tuple[int, int],
  *,
  unit: str = 'unit',
) -> list[UnitSpec]:
  """The specs of a backbone's units, stage by stage, named `stage<s>/<unit><u>` (from 1).

  Args:
    stages: (units, mid channels, out channels) of each stage; the first unit of every stage but
      the first has stride 2, every other unit stride 1.
    in_channels: channels of the first unit's input (the stem's output).
    size: spatial size of the first unit's input.
    unit: what a unit is called in its name ('unit', 'block').
  """
  height, width = size
  specs = []
  for s, (units, mid, out) in enumerate(stages):
    for u in range(units):
      stride = 2 if (s > 0 and u == 0) else 1
      height, width = layers.ceil_div(height, stride), layers.ceil_div(width, stride)
      name = f'stage{s + 1}/{unit}{u + 1}'
      specs.append(UnitSpec(name, in_channels, mid, out, stride, (height, width)))
      in_channels = out
  return specs


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
  slicer = layers.GateSlicer(gates, sum(widths))
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


class ResNetBackbone(layers.Backbone):
  """What the ImageNet and CIFAR ResNets share: stages of residual units after a stem, gated,
  prunable and locally gateable alike. A subclass states its stages (`stages`), stem
  (`STEM_CHANNELS`, `_stem`, `stem_size`), what follows the units if anything (`_after_units`),
  its units (`bottleneck`, `BOTTLENECK_UNIT`, `BASIC_PROJECTION`) and default input size
  (`IMAGE_SIZE`).

  Attributes (besides `layers.Backbone`'s, keyword-only):
    pruning: an export's channel plan (models/pruning.py), or None.
    gate_placement: 'last' (GaterNet: each unit's last convolution) or 'first' (local gating,
      Batch-Shaping: each unit's first convolution).
    skip_off_units: in evaluation, a GaterNet unit whose gates are all off for the whole batch
      is not computed (`skip_if_all_off`); the outputs are the same.
    strided_padding: how the strided convolutions (and pools) pad (layers.STRIDED_PADDINGS).
  """

  pruning: Pruning | None = keyword(None)
  gate_placement: str = keyword('last')
  skip_off_units: bool = keyword(False)
  strided_padding: str = keyword('symmetric')

  STEM_CHANNELS = 0  # unscaled channels of the stem's output
  IMAGE_SIZE = (0, 0)  # the default input's spatial size
  BOTTLENECK_UNIT = None  # the unit module where `bottleneck` (a `layers.ResidualUnit`)
  BASIC_PROJECTION = False  # basic units' shortcut where the shape changes (layers.BasicUnit)

  def stages(self) -> list[tuple[int, int, int]]:
    """(units, mid, out) of each stage, before `width` scales the channels."""
    raise NotImplementedError

  def stem_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of the stem's output (the first unit's input)."""
    return image_size

  def unit_specs(self, image_size: tuple[int, int] | None = None) -> list[UnitSpec]:
    stages = [
      (units, layers.scaled_channels(mid, self.width), layers.scaled_channels(out, self.width))
      for units, mid, out in self.stages()
    ]
    size = self.stem_size(self.IMAGE_SIZE if image_size is None else tuple(image_size))
    return stage_specs(stages, layers.scaled_channels(self.STEM_CHANNELS, self.width), size)

  def gate_layout(self, image_shape: tuple[int, int, int] | None = None) -> list[GatedLayer]:
    """The gated layers (last or first conv of every unit), from the configuration alone."""
    specs = self.unit_specs(None if image_shape is None else image_shape[:2])
    return gate_layout_for(
      specs, self.gate_placement, bottleneck=self.bottleneck, pruning=self.pruning
    )

  @nn.compact
  def __call__(self, x: jax.Array, gates: jax.Array | None = None, *, train: bool) -> jax.Array:
    specs = self.unit_specs(x.shape[1:3])
    x = self._stem(x.astype(self.dtype), train)
    skip_in = self if self.skip_off_units else None
    x = gated_units(
      x, specs, gates, self._make_unit, train=train, pruning=self.pruning, skip_in=skip_in
    )
    return self._pool_and_classify(self._after_units(x, train))

  def _stem_conv(self, x, kernel: int, stride: int = 1, *, train: bool, normalize: bool = True):
    """The stem's convolution ('stem_conv'), then batch norm ('stem_bn') and ReLU if
    `normalize`."""
    channels = layers.scaled_channels(self.STEM_CHANNELS, self.width)
    x = layers.conv(
      channels, kernel, stride, dtype=self.dtype, name='stem_conv', padding=self.strided_padding
    )(x)
    if normalize:
      x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    return x

  def _stem(self, x, train):
    raise NotImplementedError

  def _after_units(self, x, train):
    """What comes between the last unit and the pooling: nothing, unless a subclass says so."""
    del train
    return x

  @nn.nowrap  # unwrapped: the unit binds to the module on top of the call stack (nn.cond's)
  def _make_unit(self, spec: UnitSpec, name: str, pruned: PrunedLayer | None) -> nn.Module:
    if self.bottleneck:
      unit = self.BOTTLENECK_UNIT
    else:
      unit = functools.partial(layers.BasicUnit, projection=self.BASIC_PROJECTION)
    return unit(
      spec.mid_channels,
      spec.out_channels,
      spec.stride,
      self.se_reduction,
      dtype=self.dtype,
      pruned=pruned,
      gate_first=self.gate_placement == 'first',
      strided_padding=self.strided_padding,
      name=name,
    )
