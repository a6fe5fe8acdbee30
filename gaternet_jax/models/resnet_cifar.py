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

import flax.linen as nn

from gaternet_jax.models import layers, units
from gaternet_jax.models import pruning as pruning_lib

# (mid, out) channels of each stage's units.
BASIC_STAGES = ((16, 16), (32, 32), (64, 64))
BOTTLENECK_STAGES = ((4, 16), (32, 128), (64, 256))  # paper footnote 2
STEM_CHANNELS = 16


class PreActBottleneckUnit(layers.ResidualUnit):
  """Pre-activation bottleneck unit (He et al. 2016b); projection shortcut when the shape changes."""

  @nn.compact
  def __call__(self, x, gate, *, train):
    gate, local, first, last, features = self._plans(gate)
    projection = self.stride > 1 or x.shape[-1] != self.out
    if not features and not projection:  # every filter removed: the unit is the identity
      return x
    pre = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='bn1')(x))
    shortcut = x
    if projection:
      shortcut = layers.conv(self.out, 1, self.stride, dtype=self.dtype, name='proj')(pre)
    if not features:
      return shortcut
    y = self._bottleneck_convs(pre, x, local, first, features, bns=('bn2', 'bn3'), train=train)
    if self.se_reduction:
      y = layers.SqueezeExcite(self.se_reduction, dtype=self.dtype, name='se')(y)
    y = layers.gate_kept_channels(y, gate, last)
    return pruning_lib.add_to_shortcut(shortcut, y, last)


class CifarResNet(units.ResNetBackbone):
  """ResNet for 32x32 inputs, optionally gated, widened, or with squeeze-and-excitation.

  Attributes (besides `units.ResNetBackbone`'s, keyword-only):
    depth: 6n+2 for basic blocks (20, 56, 110, ...), 9n+2 for bottleneck units (164, ...).
    bottleneck: pre-activation bottleneck units (ResNet-164) instead of basic blocks.
  """

  depth: int
  bottleneck: bool = False

  STEM_CHANNELS = STEM_CHANNELS
  IMAGE_SIZE = (32, 32)
  BOTTLENECK_UNIT = PreActBottleneckUnit
  BASIC_PROJECTION = False  # option A

  def units_per_stage(self) -> int:
    per_unit, kind = (9, 'bottleneck (9n+2)') if self.bottleneck else (6, 'basic (6n+2)')
    return layers.repeats_of(self.depth, per_unit, 2, f'{kind} CIFAR ResNet depth')

  def stages(self) -> list[tuple[int, int, int]]:
    n = self.units_per_stage()
    return [(n, mid, out) for mid, out in (BOTTLENECK_STAGES if self.bottleneck else BASIC_STAGES)]

  def _stem(self, x, train):
    # Pre-activation nets normalize at the start of each unit instead.
    return self._stem_conv(x, 3, train=train, normalize=not self.bottleneck)

  def _after_units(self, x, train):
    if self.bottleneck:  # the pre-activation units' last activation
      x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='final_bn')(x))
    return x
