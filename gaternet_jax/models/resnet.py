"""ImageNet ResNets (He et al. 2016a): ResNet-18/34 (basic blocks), -50/101/152 (bottlenecks).

The standard torchvision/flax layout: a 7x7/2 stem and a 3x3/2 max-pool, four stages of 64, 128,
256, 512 (x4 for bottlenecks) channels, projection shortcuts (option B) where the shape changes,
the stride on the 3x3 convolution of a bottleneck. ResNet-34 has 21.80M parameters, -101 44.55M,
-152 60.19M, as in the paper's Table 3. The gated layer of each unit is its last convolution
(GaterNet), or its first one under local gating (`gate_placement='first'`, Batch-Shaping).
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

STAGE_SIZES = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_CHANNELS = 64


class ResNet(nn.Module):
  """ImageNet ResNet, optionally gated, widened, or with squeeze-and-excitation.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    num_classes: classifier outputs; ignored when `include_head` is False.
    width: multiplies every layer's channel count (the -Wider variants).
    se_reduction: squeeze-and-excitation reduction ratio in every unit; 0 disables SE.
    include_head: False drops the classifier and returns pooled features (the gater's extractor).
    dtype: computation dtype (parameters and batch statistics stay float32).
    pruning: an export's channel plan (models/pruning.py), or None.
    gate_placement: 'last' (GaterNet) or 'first' (local gating), as in `CifarResNet`.
    skip_off_units: in evaluation, a GaterNet unit whose gates are all off for the whole batch
      is not computed (layers.skip_if_all_off); the outputs are the same.
    strided_padding: how the stem, the max-pool and the strided 3x3 convolutions pad
      (layers.STRIDED_PADDINGS; 'symmetric' is torchvision's (3, 3) stem and (1, 1) pool).
  """

  depth: int
  num_classes: int = 1000
  width: float = 1.0
  se_reduction: int = 0
  include_head: bool = True
  dtype: Any = jnp.float32
  pruning: Pruning | None = None
  gate_placement: str = 'last'
  skip_off_units: bool = False
  strided_padding: str = 'symmetric'

  @property
  def bottleneck(self) -> bool:
    return self.depth >= 50

  def unit_specs(self, image_size: tuple[int, int] = (224, 224)) -> list[UnitSpec]:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f'ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}')
    expansion = 4 if self.bottleneck else 1
    in_channels = layers.scaled_channels(STEM_CHANNELS, self.width)
    height, width = (
      layers.ceil_div(layers.ceil_div(d, 2), 2) for d in image_size
    )  # stem conv + max-pool
    specs = []
    for s, (units, base) in enumerate(zip(STAGE_SIZES[self.depth], STAGE_WIDTHS)):
      mid = layers.scaled_channels(base, self.width)
      out = layers.scaled_channels(base * expansion, self.width)
      for u in range(units):
        stride = 2 if (s > 0 and u == 0) else 1
        height, width = layers.ceil_div(height, stride), layers.ceil_div(width, stride)
        specs.append(
          UnitSpec(f'stage{s + 1}/unit{u + 1}', in_channels, mid, out, stride, (height, width))
        )
        in_channels = out
    return specs

  def gate_layout(self, image_shape: tuple[int, int, int] = (224, 224, 3)) -> list[GatedLayer]:
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
    padding = self.strided_padding
    x = layers.conv(stem, 7, 2, dtype=self.dtype, name='stem_conv', padding=padding)(x)
    x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    # flax pads a max-pool with -inf, as torchvision's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=layers.padding_for(3, padding))

    def make_unit(spec, name, pruned):
      args = (spec.mid_channels, spec.out_channels, spec.stride, self.se_reduction)
      kwargs = dict(
        dtype=self.dtype,
        pruned=pruned,
        gate_first=self.gate_placement == 'first',
        strided_padding=padding,
        name=name,
      )
      if self.bottleneck:
        return BottleneckUnit(*args, **kwargs)
      return layers.BasicUnit(*args, projection=True, **kwargs)

    skip_in = self if self.skip_off_units else None
    x = layers.gated_units(
      x, specs, gates, make_unit, train=train, pruning=self.pruning, skip_in=skip_in
    )
    return layers.pool_and_classify(
      x, include_head=self.include_head, num_classes=self.num_classes, dtype=self.dtype
    )


class BottleneckUnit(nn.Module):
  """Post-activation bottleneck (1x1, 3x3 with the stride, 1x1), gated on conv3's output."""

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
    shortcut = x
    if self.stride > 1 or x.shape[-1] != self.out:
      shortcut = layers.conv(self.out, 1, self.stride, dtype=self.dtype, name='proj_conv')(x)
      shortcut = layers.batch_norm(train, dtype=self.dtype, name='proj_bn')(shortcut)
    features = layers.gated_features(self.out, last, self.se_reduction)
    if not features:  # every filter removed: the unit is its shortcut
      return nn.relu(shortcut)
    y = layers.first_conv_pair(
      x, x, local, first, mid=self.mid, kernel1=1, stride1=1, out2=self.mid, kernel2=3,
      stride2=self.stride, bn1='bn1', train=train, dtype=self.dtype,
      padding=self.strided_padding,
    )  # fmt: skip
    y = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='bn2')(y))
    y = layers.conv(features, 1, dtype=self.dtype, name='conv3')(y)
    y = layers.normalize_and_gate(
      y, gate, last, se_reduction=self.se_reduction, train=train, dtype=self.dtype, name='bn3'
    )
    return nn.relu(pruning_lib.add_to_shortcut(shortcut, y, last))
