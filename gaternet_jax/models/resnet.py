"""ImageNet ResNets (He et al. 2016a): ResNet-18/34 (basic blocks), -50/101/152 (bottlenecks).

The standard torchvision/flax layout: a 7x7/2 stem and a 3x3/2 max-pool, four stages of 64, 128,
256, 512 (x4 for bottlenecks) channels, projection shortcuts (option B) where the shape changes,
the stride on the 3x3 convolution of a bottleneck. ResNet-34 has 21.80M parameters, -101 44.55M,
-152 60.19M, as in the paper's Table 3. The gated layer of each unit is its last convolution
(GaterNet), or its first one under local gating (`gate_placement='first'`, Batch-Shaping).
"""

from __future__ import annotations

import flax.linen as nn

from gaternet_jax.models import layers, units
from gaternet_jax.models import pruning as pruning_lib
from gaternet_jax.models.layers import keyword

STAGE_SIZES = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_CHANNELS = 64


class BottleneckUnit(layers.ResidualUnit):
  """Post-activation bottleneck (1x1, 3x3 with the stride, 1x1), gated on conv3's output
  (conv1's under `gate_first`); a projection shortcut where the shape changes."""

  @nn.compact
  def __call__(self, x, gate, *, train):
    gate, local, first, last, features = self._plans(gate)
    shortcut = self._shortcut(x, train)
    if not features:  # every filter removed: the unit is its shortcut
      return nn.relu(shortcut)
    y = self._bottleneck_convs(x, x, local, first, features, bns=('bn1', 'bn2'), train=train)
    y = layers.normalize_and_gate(
      y, gate, last, se_reduction=self.se_reduction, train=train, dtype=self.dtype, name='bn3'
    )
    return nn.relu(pruning_lib.add_to_shortcut(shortcut, y, last))


class ResNet(units.ResNetBackbone):
  """ImageNet ResNet, optionally gated, widened, or with squeeze-and-excitation.

  Attributes (besides `units.ResNetBackbone`'s, keyword-only; `num_classes` defaults to 1000):
    depth: 18, 34, 50, 101 or 152.

  `strided_padding` also pads the stem and the max-pool ('symmetric' is torchvision's (3, 3)
  stem and (1, 1) pool).
  """

  depth: int
  num_classes: int = keyword(1000)

  STEM_CHANNELS = STEM_CHANNELS
  IMAGE_SIZE = (224, 224)
  BOTTLENECK_UNIT = BottleneckUnit
  BASIC_PROJECTION = True

  @property
  def bottleneck(self) -> bool:
    return self.depth >= 50

  def stages(self) -> list[tuple[int, int, int]]:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f'ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}')
    expansion = 4 if self.bottleneck else 1
    return [(n, base, base * expansion) for n, base in zip(STAGE_SIZES[self.depth], STAGE_WIDTHS)]

  def stem_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
    return tuple(layers.ceil_div(layers.ceil_div(d, 2), 2) for d in image_size)  # conv, pool

  def _stem(self, x, train):
    x = self._stem_conv(x, 7, 2, train=train)
    # flax pads a max-pool with -inf, as torchvision's MaxPool2d(3, 2, padding=1) does.
    padding = layers.padding_for(3, self.strided_padding)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)
