"""Inception-v4 (Szegedy et al. 2017, figures 3-9) at 299x299: the backbone of Table 3's last rows.

Filter counts and paddings follow the paper's figures and TF-slim's `nets/inception_v4.py` (where
the figures are ambiguous, e.g. the order of the 1x7/7x1 factorisations): a stem of three
convolutions and three concatenations (299x299x3 -> 35x35x384), 4 x Inception-A (384), Reduction-A
(k, l, m, n = 192, 224, 256, 384; -> 17x17x1024), 7 x Inception-B (1024), Reduction-B (-> 8x8x1536),
3 x Inception-C (1536), global average pooling, dropout (keep 0.8) and the classifier. Every
convolution is conv + batch norm + ReLU, without a conv bias and, as in TF-slim, without a BN scale
(a ReLU follows, and the next layer can absorb a per-channel scale). No auxiliary classifier: the
training step has no auxiliary loss, so its parameters would only count, never learn. This gives
42.65M parameters (1000 classes) and 12.25 GMACs per image; Table 3's 44.50M is not reproducible
(see tests/test_inception_v4.py for the arithmetic of the candidates).

Gating (paper section 4.4): "we apply filter selection to all the feature maps after the channel
concatenation operations", one gated layer per concatenation that ends a block: the stem's three
(160 + 192 + 384 channels), 4 x 384, 1024, 7 x 1024, 1536, 3 x 1536 = 16,608 gated filters (Table
3). Inception-C's inner 1x3/3x1 concatenations are part of a branch, not a block output, and are
not gated (gating them too would give 19,680). Channels that come from a pooling branch are gated
like the others. A concatenated channel's cost is not uniform (a 1x1 branch is cheap, a 7x7
factorised one is not; a pooled channel costs nothing), so `macs_per_filter` of a gated layer is
the MACs of all convolutions of its block divided by the block's output channels, rounded down;
the first three stem convolutions belong to no block and are attributed to no gated layer.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.layout import GatedLayer
from gaternet_jax.models import layers

# A convolution is (features, kernel_h, kernel_w) with stride 1 and 'SAME' padding, or (features,
# kernel_h, kernel_w, stride, 'VALID') (the paper's "V"). A branch is a sequence of steps applied in
# order; a step is a convolution, 'max' (3x3/2 VALID max-pool), 'avg' (3x3/1 SAME average pool), or
# a list of convolutions applied to the same input and concatenated (Inception-C's split 1x3/3x1).
STEM_CONVS = ((32, 3, 3, 2, 'VALID'), (32, 3, 3, 1, 'VALID'), (64, 3, 3))
V2 = (2, 'VALID')  # stride 2, valid: the reductions
STEM1 = (('max',), ((96, 3, 3, *V2),))
STEM2 = (
  ((64, 1, 1), (96, 3, 3, 1, 'VALID')),
  ((64, 1, 1), (64, 1, 7), (64, 7, 1), (96, 3, 3, 1, 'VALID')),
)
STEM3 = (((192, 3, 3, *V2),), ('max',))
INCEPTION_A = (
  ((96, 1, 1),),
  ((64, 1, 1), (96, 3, 3)),
  ((64, 1, 1), (96, 3, 3), (96, 3, 3)),
  ('avg', (96, 1, 1)),
)
REDUCTION_A = (  # k = 192, l = 224, m = 256, n = 384
  ((384, 3, 3, *V2),),
  ((192, 1, 1), (224, 3, 3), (256, 3, 3, *V2)),
  ('max',),
)
INCEPTION_B = (
  ((384, 1, 1),),
  ((192, 1, 1), (224, 1, 7), (256, 7, 1)),
  ((192, 1, 1), (192, 7, 1), (224, 1, 7), (224, 7, 1), (256, 1, 7)),
  ('avg', (128, 1, 1)),
)
REDUCTION_B = (
  ((192, 1, 1), (192, 3, 3, *V2)),
  ((256, 1, 1), (256, 1, 7), (320, 7, 1), (320, 3, 3, *V2)),
  ('max',),
)
INCEPTION_C = (
  ((256, 1, 1),),
  ((384, 1, 1), [(256, 1, 3), (256, 3, 1)]),
  ((384, 1, 1), (448, 3, 1), (512, 1, 3), [(256, 1, 3), (256, 3, 1)]),
  ('avg', (256, 1, 1)),
)
BLOCKS = (
  ('stem/concat1', STEM1),
  ('stem/concat2', STEM2),
  ('stem/concat3', STEM3),
  *((f'inception_a{i + 1}', INCEPTION_A) for i in range(4)),
  ('reduction_a', REDUCTION_A),
  *((f'inception_b{i + 1}', INCEPTION_B) for i in range(7)),
  ('reduction_b', REDUCTION_B),
  *((f'inception_c{i + 1}', INCEPTION_C) for i in range(3)),
)

# TF-slim's initializer for Inception (He et al.: fan-in, truncated normal).
_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


def _conv_args(spec) -> tuple[int, int, int, int, str]:
  features, kh, kw, *rest = spec
  stride, padding = rest if rest else (1, 'SAME')
  return features, kh, kw, stride, padding


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
  if padding == 'SAME':
    return layers.ceil_div(size, stride)
  return (size - kernel) // stride + 1


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static description of one concatenation, shared by the module and its gate layout."""

  name: str
  out_channels: int
  out_size: tuple[int, int]
  macs: int  # of all convolutions inside the block, per image


def _walk_branch(branch, channels, size, width):
  """(out channels, out size, conv MACs) of one branch, from its table entry alone."""
  macs = 0
  for step in branch:
    if step in ('max', 'avg'):
      size = tuple(_out_size(s, 3, 2, 'VALID') for s in size) if step == 'max' else size
      continue
    outs = 0
    for spec in step if isinstance(step, list) else [step]:
      features, kh, kw, stride, padding = _conv_args(spec)
      features = layers.scaled_channels(features, width)
      out = (_out_size(size[0], kh, stride, padding), _out_size(size[1], kw, stride, padding))
      macs += kh * kw * channels * features * out[0] * out[1]
      outs += features
    channels, size = outs, out
  return channels, size, macs


def block_specs(width: float, image_size: tuple[int, int]) -> list[BlockSpec]:
  """Every gated concatenation's channels, spatial size and MACs, from the configuration alone."""
  channels, size = 3, tuple(image_size)
  for spec in STEM_CONVS:
    channels, size, _ = _walk_branch((spec,), channels, size, width)
  specs = []
  for name, branches in BLOCKS:
    results = [_walk_branch(branch, channels, size, width) for branch in branches]
    sizes = {r[1] for r in results}
    if len(sizes) != 1:
      raise ValueError(f'{name}: branches disagree on the spatial size {sorted(sizes)}')
    channels, size = sum(r[0] for r in results), sizes.pop()
    specs.append(BlockSpec(name, channels, size, sum(r[2] for r in results)))
  return specs


class InceptionV4(layers.NoSEBackbone):
  """Inception-v4, optionally gated after every block's concatenation.

  Attributes (besides `layers.Backbone`'s; `se_reduction` must be 0, the paper has no
  Inception-v4-SE row, and `include_head` False also drops the dropout):
    dropout_keep: keep probability of the dropout before the classifier (0.8, as in the paper).
  """

  ARCHITECTURE = 'Inception-v4'
  num_classes: int = layers.keyword(1000)
  dropout_keep: float = layers.keyword(0.8)

  def gate_layout(self, image_shape: tuple[int, int, int] = (299, 299, 3)) -> list[GatedLayer]:
    """One gated layer per block concatenation (see the module docstring for its MACs)."""
    return [
      GatedLayer(s.name, s.out_channels, s.macs // s.out_channels)
      for s in block_specs(self.width, image_shape[:2])
    ]

  def _conv_bn_relu(self, x, spec, train, name):
    features, kh, kw, stride, padding = _conv_args(spec)
    x = nn.Conv(
      layers.scaled_channels(features, self.width),
      (kh, kw),
      strides=(stride, stride),
      padding=padding,
      use_bias=False,
      kernel_init=_kernel_init,
      dtype=self.dtype,
      name=f'{name}_conv',
    )(x)
    # TF-slim's Inception batch norm: no scale, epsilon 1e-3; momentum as in every other backbone.
    bn = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-3,
      use_scale=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name=f'{name}_bn',
    )
    return nn.relu(bn(x))

  def _branch(self, x, branch, train, name):
    for i, step in enumerate(branch):
      if step == 'max':
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
      elif step == 'avg':
        # TF's SAME average pool divides by the number of real (not padded) inputs.
        x = nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False)
      elif isinstance(step, list):
        parts = [self._conv_bn_relu(x, s, train, f'{name}_{i}{j}') for j, s in enumerate(step)]
        x = jnp.concatenate(parts, axis=-1)
      else:
        x = self._conv_bn_relu(x, step, train, f'{name}_{i}')
    return x

  @nn.compact
  def __call__(self, x: jax.Array, gates: jax.Array | None = None, *, train: bool) -> jax.Array:
    specs = block_specs(self.width, x.shape[1:3])
    slicer = layers.GateSlicer(gates, sum(s.out_channels for s in specs))
    x = x.astype(self.dtype)
    for i, spec in enumerate(STEM_CONVS):
      x = self._conv_bn_relu(x, spec, train, f'stem_{i}')
    for (name, branches), spec in zip(BLOCKS, specs):
      prefix = name.replace('/', '_')
      parts = [self._branch(x, b, train, f'{prefix}_b{i}') for i, b in enumerate(branches)]
      x = jnp.concatenate(parts, axis=-1)
      assert x.shape[1:] == (*spec.out_size, spec.out_channels), (name, x.shape, spec)
      x = layers.apply_gate(x, slicer.next(spec.out_channels))
    slicer.check_consumed()

    x = jnp.mean(x, axis=(1, 2))
    if not self.include_head:
      return x
    if train:
      # The training step provides a single rng stream, 'gates' (see steps.train_step), for every
      # model, plain ones included; the dropout mask is drawn from it rather than from 'dropout'.
      keep = jax.random.bernoulli(self.make_rng('gates'), self.dropout_keep, x.shape)
      x = jnp.where(keep, x / self.dropout_keep, 0.0).astype(x.dtype)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


BACKBONES = {'inception_v4': InceptionV4}
