"""CIFAR ResNets: ResNet-20/56/110 (He et al. 2016a) and the paper's ResNet-164 (He et al. 2016b).

ResNet-6n+2 uses post-activation basic blocks with parameter-free shortcuts (option A: subsample and
zero-pad channels), which is what gives ResNet-20 its 0.27M parameters. ResNet-9n+2 (164) uses
pre-activation bottleneck units with projection shortcuts where the shape changes; as footnote 2 of
the paper says, its first stage's units are 16-4-16 (then 32-32-128 and 64-64-256), which gives 1.62M
parameters and 7,200 gated filters.

The gated layer of every residual unit is its last convolution: the gate multiplies that
convolution's (batch-normalized) output channels before the residual addition. Under local gating
(`gate_placement='first'`, Batch-Shaping) it is the unit's first convolution instead, gated by
the unit's own gating module (gating/local.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.layout import GatedLayer
from gaternet_jax.models import layers, pruning as pruning_lib
from gaternet_jax.models.layers import UnitSpec
from gaternet_jax.models.pruning import PrunedLayer, Pruning

# (mid, out) channels of each stage's units.
BASIC_STAGES = ((16, 16), (32, 32), (64, 64))
BOTTLENECK_STAGES = ((4, 16), (32, 128), (64, 256))  # paper footnote 2
STEM_CHANNELS = 16


class CifarResNet(nn.Module):
  """ResNet for 32x32 inputs, optionally gated, widened, or with squeeze-and-excitation.

  Attributes:
    depth: 6n+2 for basic blocks (20, 56, 110, ...), 9n+2 for bottleneck units (164, ...).
    num_classes: classifier outputs; ignored when `include_head` is False.
    bottleneck: pre-activation bottleneck units (ResNet-164) instead of basic blocks.
    width: multiplies every layer's channel count (the -Wider variants).
    se_reduction: squeeze-and-excitation reduction ratio in every unit; 0 disables SE.
    include_head: False drops the classifier and returns pooled features (the gater's extractor).
    dtype: computation dtype (parameters and batch statistics stay float32).
    pruning: an export's channel plan (models/pruning.py), or None.
    gate_placement: 'last' (GaterNet: each unit's last convolution) or 'first' (local gating,
      Batch-Shaping: each unit's first convolution).
    skip_off_units: in evaluation, a GaterNet unit whose gates are all off for the whole batch
      is not computed (layers.skip_if_all_off); the outputs are the same.
    strided_padding: how strided convolutions pad (layers.STRIDED_PADDINGS).
  """

  depth: int
  num_classes: int = 10
  bottleneck: bool = False
  width: float = 1.0
  se_reduction: int = 0
  include_head: bool = True
  dtype: Any = jnp.float32
  pruning: Pruning | None = None
  gate_placement: str = 'last'
  skip_off_units: bool = False
  strided_padding: str = 'symmetric'

  def units_per_stage(self) -> int:
    per_unit = 9 if self.bottleneck else 6
    if (self.depth - 2) % per_unit or self.depth < 2 + per_unit:
      kind = 'bottleneck (9n+2)' if self.bottleneck else 'basic (6n+2)'
      raise ValueError(f'depth {self.depth} is not a valid {kind} CIFAR ResNet depth')
    return (self.depth - 2) // per_unit

  def unit_specs(self, image_size: tuple[int, int] = (32, 32)) -> list[UnitSpec]:
    stages = BOTTLENECK_STAGES if self.bottleneck else BASIC_STAGES
    in_channels = layers.scaled_channels(STEM_CHANNELS, self.width)
    height, width = image_size
    specs = []
    for s, (mid, out) in enumerate(stages):
      mid, out = layers.scaled_channels(mid, self.width), layers.scaled_channels(out, self.width)
      for u in range(self.units_per_stage()):
        stride = 2 if (s > 0 and u == 0) else 1
        height, width = layers.ceil_div(height, stride), layers.ceil_div(width, stride)
        specs.append(
          UnitSpec(f'stage{s + 1}/unit{u + 1}', in_channels, mid, out, stride, (height, width))
        )
        in_channels = out
    return specs

  def gate_layout(self, image_shape: tuple[int, int, int] = (32, 32, 3)) -> list[GatedLayer]:
    """The gated layers (last or first conv of every unit), from the configuration alone."""
    specs = self.unit_specs(image_shape[:2])
    return layers.gate_layout_for(
      specs, self.gate_placement, bottleneck=self.bottleneck, pruning=self.pruning
    )

  @nn.compact
  def __call__(self, x: jax.Array, gates: jax.Array | None = None, *, train: bool) -> jax.Array:
    specs = self.unit_specs(x.shape[1:3])
    x = x.astype(self.dtype)
    stem = layers.scaled_channels(STEM_CHANNELS, self.width)
    x = layers.conv(stem, 3, dtype=self.dtype, name='stem_conv')(x)
    if not self.bottleneck:  # pre-activation nets normalize at the start of each unit instead
      x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='stem_bn')(x))

    def make_unit(spec, name, pruned):
      args = (spec.mid_channels, spec.out_channels, spec.stride, self.se_reduction)
      kwargs = dict(
        dtype=self.dtype,
        pruned=pruned,
        gate_first=self.gate_placement == 'first',
        strided_padding=self.strided_padding,
        name=name,
      )
      if self.bottleneck:
        return PreActBottleneckUnit(*args, **kwargs)
      return layers.BasicUnit(*args, projection=False, **kwargs)

    skip_in = self if self.skip_off_units else None
    x = layers.gated_units(
      x, specs, gates, make_unit, train=train, pruning=self.pruning, skip_in=skip_in
    )
    if self.bottleneck:
      x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='final_bn')(x))
    return layers.pool_and_classify(
      x, include_head=self.include_head, num_classes=self.num_classes, dtype=self.dtype
    )


class PreActBottleneckUnit(nn.Module):
  """Pre-activation bottleneck unit (He et al. 2016b); projection shortcut when the shape changes."""

  mid: int
  out: int
  stride: int
  se_reduction: int
  dtype: Any
  pruned: PrunedLayer | None = None  # an export's plan for conv3's filters (conv1's: gate_first)
  gate_first: bool = False  # gated on conv1 (local gating) rather than conv3
  strided_padding: str = 'symmetric'  # of the strided 3x3 convolution (layers.STRIDED_PADDINGS)

  @nn.compact
  def __call__(self, x, gate, *, train):
    gate, local = layers.split_gate(gate)
    first, last = layers.plans_by_conv(self.pruned, self.gate_first)
    features = layers.gated_features(self.out, last, self.se_reduction)
    projection = self.stride > 1 or x.shape[-1] != self.out
    if not features and not projection:  # every filter removed: the unit is the identity
      return x
    pre = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='bn1')(x))
    shortcut = x
    if projection:
      shortcut = layers.conv(self.out, 1, self.stride, dtype=self.dtype, name='proj')(pre)
    if not features:
      return shortcut
    y = layers.first_conv_pair(
      pre, x, local, first, mid=self.mid, kernel1=1, stride1=1, out2=self.mid, kernel2=3,
      stride2=self.stride, bn1='bn2', train=train, dtype=self.dtype,
      padding=self.strided_padding,
    )  # fmt: skip
    y = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='bn3')(y))
    y = layers.conv(features, 1, dtype=self.dtype, name='conv3')(y)
    if self.se_reduction:
      y = layers.SqueezeExcite(self.se_reduction, dtype=self.dtype, name='se')(y)
    y = layers.gate_kept_channels(y, gate, last)
    return pruning_lib.add_to_shortcut(shortcut, y, last)
