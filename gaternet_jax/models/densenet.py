"""DenseNet-BC for CIFAR (Huang et al. 2017), the backbone of Table 2's DenseNet rows.

DenseNet-BC with depth L and growth rate k: a 3x3 stem conv with 2k channels, then 3 dense blocks of
n = (L - 4) / 6 bottleneck layers (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k), each layer's k
new feature maps concatenated to the block's features; between blocks a transition (BN-ReLU-1x1
conv to floor(0.5 x channels), 2x2 average pool); finally BN-ReLU, global average pool, linear head.
No dropout (the original uses none with data augmentation).

Gates (section 4.4): "we apply filter selection to all the convolutional layers except the first in
each dense block". The gated filters are the 3x3 convs of the dense layers: each layer's k new
feature maps are multiplied by their gates (eq. 4) before they join the concatenation, so a closed
gate removes that map from every later layer's input. This gives Table 2's counts, 3 x (n - 1) x k:
540 (L=100, k=12), 2,880 (L=250, k=24), 3,600 (L=190, k=40).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.layout import GatedLayer, total_filters
from gaternet_jax.models import layers

NUM_BLOCKS = 3
BOTTLENECK_FACTOR = 4  # the 1x1 conv of a BC layer outputs 4k channels
COMPRESSION = 0.5  # theta of the transitions (the "C" of BC)


class DenseNetBC(layers.NoSEBackbone):
  """DenseNet-BC for 32x32 inputs, optionally gated.

  Attributes (besides `layers.Backbone`'s, keyword-only; `se_reduction` must be 0):
    depth: L = 6n + 4 (n bottleneck layers per block; each counts as two convolutions).
    growth: k, the channels each dense layer adds (`width` multiplies it, and so the stem's 2k and
      the bottleneck's 4k channels).
  """

  depth: int
  growth: int

  ARCHITECTURE = 'DenseNet-BC'

  def layers_per_block(self) -> int:
    return layers.repeats_of(self.depth, 6, 4, 'DenseNet-BC depth (6n + 4)')

  def scaled_growth(self) -> int:
    return layers.scaled_channels(self.growth, self.width)

  def gate_layout(self, image_shape: tuple[int, int, int] = (32, 32, 3)) -> list[GatedLayer]:
    """The gated dense layers (all but the first of each block), from the configuration alone."""
    k, n = self.scaled_growth(), self.layers_per_block()
    height, width = image_shape[:2]
    layout = []
    for b in range(NUM_BLOCKS):
      if b:  # the transition's 2x2 average pool ('VALID': floor, as in the original)
        height, width = height // 2, width // 2
      # A gated filter is one 3x3 conv filter over the 4k bottleneck channels at every position.
      macs = 9 * BOTTLENECK_FACTOR * k * height * width
      layout += [GatedLayer(f'block{b + 1}/layer{i + 1}', k, macs) for i in range(1, n)]
    return layout

  @nn.compact
  def __call__(self, x: jax.Array, gates: jax.Array | None = None, *, train: bool) -> jax.Array:
    k, n = self.scaled_growth(), self.layers_per_block()
    slicer = layers.GateSlicer(gates, total_filters(self.gate_layout(x.shape[1:])))
    x = layers.conv(2 * k, 3, dtype=self.dtype, name='stem_conv')(x.astype(self.dtype))
    for b in range(NUM_BLOCKS):
      if b:  # compression: floor(theta x channels), as the original's math.floor
        features = int(COMPRESSION * x.shape[-1])
        x = Transition(features, dtype=self.dtype, name=f'transition{b}')(x, train=train)
      for i in range(n):
        layer = BottleneckLayer(k, dtype=self.dtype, name=f'block{b + 1}_layer{i + 1}')
        new = layer(x, train=train)  # the layer's k new feature maps
        if i > 0:  # "all the convolutional layers except the first in each dense block"
          new = layers.apply_gate(new, slicer.next(k))  # eq. 4: O_i = phi(F_i * I) * g_i
        x = jnp.concatenate([x, new], axis=-1)
    slicer.check_consumed()
    x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='final_bn')(x))
    return self._pool_and_classify(x)


def bn_relu_conv(x, features: int, kernel: int, suffix: str, *, train: bool, dtype):
  """Batch norm ('bn<suffix>'), ReLU, a convolution ('conv<suffix>'): every DenseNet-BC step."""
  x = nn.relu(layers.batch_norm(train, dtype=dtype, name=f'bn{suffix}')(x))
  return layers.conv(features, kernel, dtype=dtype, name=f'conv{suffix}')(x)


class BottleneckLayer(nn.Module):
  """BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k); returns the k new feature maps."""

  growth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    y = bn_relu_conv(x, BOTTLENECK_FACTOR * self.growth, 1, '1', train=train, dtype=self.dtype)
    return bn_relu_conv(y, self.growth, 3, '2', train=train, dtype=self.dtype)


class Transition(nn.Module):
  """BN-ReLU-1x1 conv (compression) - 2x2 average pool, between dense blocks."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    x = bn_relu_conv(x, self.features, 1, '', train=train, dtype=self.dtype)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='VALID')


BACKBONES = {
  'densenet_bc100_k12': functools.partial(DenseNetBC, depth=100, growth=12),
  'densenet_bc250_k24': functools.partial(DenseNetBC, depth=250, growth=24),
  'densenet_bc190_k40': functools.partial(DenseNetBC, depth=190, growth=40),
  'densenet_bc40_k4': functools.partial(DenseNetBC, depth=40, growth=4),  # tiny, for tests
}
