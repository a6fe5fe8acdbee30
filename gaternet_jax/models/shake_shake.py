"""Shake-Shake 26 2xNd for CIFAR (Gastaldi 2017), the backbone of the paper's Table 2.

The architecture follows the original Torch code (github.com/xgastaldi/shake-shake): a 3x3 conv +
BN stem of 16 channels (no ReLU), three stages of 3-branch residual blocks of widths N, 2N, 4N,
a final ReLU, global average pooling and a linear head. Each residual branch is
ReLU-conv3x3-BN-ReLU-conv3x3-BN, and the two branches are combined "Shake-Shake-Image": a random
alpha ~ U(0, 1) per image in the forward pass, an independent beta ~ U(0, 1) per image in the
backward pass, and 0.5 in evaluation. Where the shape changes, the shortcut is ReLU, then two
1x1-conv paths to out/2 channels each (the second on the input shifted by one pixel right and down,
so that with stride 2 it sees the other pixels), concatenated, then BN.

Gating (paper section 4.4): "the last convolutional layer in each branch of the residual block",
i.e. each branch's second conv, gated after its BN and before the shake combination. Per block that
is 2 x out channels: 4 blocks x 2 branches x (N + 2N + 4N) = 3,584 (N=64) and 5,376 (N=96).

Parameters: 11.65M (2x64d) and 26.19M (2x96d) with the original's 16-channel stem. Table 2's
11.71M / 26.33M are 0.5% more: exactly what a stem of N channels instead of 16 would give (stage 1's
first block then has N->N branches and an identity shortcut), 11,709,514 / 26,331,754.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.layout import GatedLayer
from gaternet_jax.models import layers
from gaternet_jax.models.units import UnitSpec, stage_specs

STEM_CHANNELS = 16
STAGE_MULTIPLIERS = (1, 2, 4)  # stage widths N, 2N, 4N


def _per_sample(v: jax.Array, like: jax.Array) -> jax.Array:
  """A (batch,) coefficient shaped to broadcast over (batch, H, W, C) in `like`'s dtype."""
  return v.reshape((-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


@jax.custom_vjp
def shake(b1: jax.Array, b2: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
  """Training-mode Shake-Shake: alpha * b1 + (1 - alpha) * b2 forward, beta in the backward pass.

  Args:
    b1, b2: the two branches' outputs, (batch, H, W, C).
    alpha: (batch,) forward coefficients.
    beta: (batch,) backward coefficients: the cotangents are beta * g and (1 - beta) * g.
  """
  a = _per_sample(alpha, b1)
  return a * b1 + (1 - a) * b2


def _shake_fwd(b1, b2, alpha, beta):
  return shake(b1, b2, alpha, beta), (alpha, beta)


def _shake_bwd(residuals, g):
  alpha, beta = residuals
  b = _per_sample(beta, g)
  # The coefficients are random draws, not parameters: no gradient flows into them.
  return b * g, (1 - b) * g, jnp.zeros_like(alpha), jnp.zeros_like(beta)


shake.defvjp(_shake_fwd, _shake_bwd)


def shake_eval(b1: jax.Array, b2: jax.Array) -> jax.Array:
  """Evaluation-mode combination: the expectation, (b1 + b2) / 2; needs no rng."""
  return 0.5 * (b1 + b2)


class ShakeShake(layers.NoSEBackbone):
  """Shake-Shake (depth) 2x(base_width)d for 32x32 inputs, optionally gated or widened.

  Attributes (besides `layers.Backbone`'s, keyword-only; `se_reduction` must be 0: Shake-Shake
  has no -SE variant in the paper):
    depth: 6n+2 with n blocks per stage (26: 4 blocks per stage).
    base_width: N, the first stage's width (the "64" of 2x64d).
    strided_padding: how the branches' strided 3x3 convolutions pad (layers.STRIDED_PADDINGS;
      'symmetric' is the Torch code's pad 1, centred on the pixels path 1 of the shortcut takes).
  """

  depth: int = 26
  base_width: int = 64
  strided_padding: str = 'symmetric'

  ARCHITECTURE = 'Shake-Shake'

  def blocks_per_stage(self) -> int:
    return layers.repeats_of(self.depth, 6, 2, 'Shake-Shake depth (6n+2)')

  def block_specs(self, image_size: tuple[int, int] = (32, 32)) -> list[UnitSpec]:
    """One spec per residual block; both branches have `out_channels` = `mid_channels`."""
    n = self.blocks_per_stage()
    outs = [
      layers.scaled_channels(self.base_width * mult, self.width) for mult in STAGE_MULTIPLIERS
    ]
    in_channels = layers.scaled_channels(STEM_CHANNELS, self.width)
    return stage_specs([(n, out, out) for out in outs], in_channels, image_size, unit='block')

  def gate_layout(self, image_shape: tuple[int, int, int] = (32, 32, 3)) -> list[GatedLayer]:
    """Two gated layers per block (each branch's last 3x3 conv over `out` channels), in the
    order the module consumes the gate vector: branch 1 then branch 2."""
    return [
      GatedLayer(
        f'{s.name}/branch{k}', s.out_channels, 9 * s.mid_channels * s.out_size[0] * s.out_size[1]
      )
      for s in self.block_specs(image_shape[:2])
      for k in (1, 2)
    ]

  @nn.compact
  def __call__(self, x: jax.Array, gates: jax.Array | None = None, *, train: bool) -> jax.Array:
    specs = self.block_specs(x.shape[1:3])
    slicer = layers.GateSlicer(gates, sum(2 * s.out_channels for s in specs))
    x = x.astype(self.dtype)
    stem = layers.scaled_channels(STEM_CHANNELS, self.width)
    x = layers.conv(stem, 3, dtype=self.dtype, name='stem_conv')(x)
    # No ReLU here, as in the original: every block applies one to its branches' (and projection
    # shortcut's) input, while identity shortcuts carry the un-rectified sum.
    x = layers.batch_norm(train, dtype=self.dtype, name='stem_bn')(x)
    for s in specs:
      block = ShakeBlock(
        s.out_channels,
        s.stride,
        dtype=self.dtype,
        strided_padding=self.strided_padding,
        name=s.name.replace('/', '_'),
      )
      x = block(x, slicer.next(s.out_channels), slicer.next(s.out_channels), train=train)
    slicer.check_consumed()
    return self._pool_and_classify(nn.relu(x))


class ShakeBlock(nn.Module):
  """A 3-branch residual block: x + shake(branch1(x), branch2(x)), gates on each branch's end."""

  out: int
  stride: int
  dtype: Any = jnp.float32
  strided_padding: str = 'symmetric'

  @nn.compact
  def __call__(self, x, gate1, gate2, *, train):
    h = nn.relu(x)
    b1 = self._branch(h, gate1, 'branch1', train)
    b2 = self._branch(h, gate2, 'branch2', train)
    if train:
      # steps.train_step only provides the Flax rng stream 'gates' (and may not be changed), so
      # the shake coefficients are drawn from it; make_rng folds in this block's path, so every
      # block gets its own draws, independent of SemHash's and the gate dropout's.
      alpha_key, beta_key = jax.random.split(self.make_rng('gates'))
      n = x.shape[0]
      y = shake(b1, b2, jax.random.uniform(alpha_key, (n,)), jax.random.uniform(beta_key, (n,)))
    else:
      y = shake_eval(b1, b2)
    return y + self._shortcut(x, h, train)

  def _branch(self, h, gate, name, train):
    conv = functools.partial(
      layers.conv, self.out, 3, dtype=self.dtype, padding=self.strided_padding
    )
    bn = functools.partial(layers.batch_norm, train, dtype=self.dtype)
    y = conv(self.stride, name=f'{name}_conv1')(h)
    y = nn.relu(bn(name=f'{name}_bn1')(y))
    y = conv(1, name=f'{name}_conv2')(y)
    y = bn(name=f'{name}_bn2')(y)
    # Looked up on the module at call time so that tests can spy on it.
    return layers.apply_gate(y, gate)

  def _shortcut(self, x, h, train):
    """Identity, or (where the shape changes) the original's two-path 1x1-conv shortcut on h."""
    if self.stride == 1 and x.shape[-1] == self.out:
      return x
    s = self.stride
    half = self.out // 2
    path1 = layers.conv(half, 1, dtype=self.dtype, name='shortcut_conv1')(h[:, ::s, ::s])
    # Shift right and down by one pixel (zeros enter at the top and left), as the Torch code's
    # SpatialZeroPadding(1, -1, 1, -1): with stride 2 this path sees the odd-indexed pixels that
    # path 1 skips.
    shifted = jnp.pad(h, ((0, 0), (1, 0), (1, 0), (0, 0)))[:, :-1, :-1]
    path2 = layers.conv(self.out - half, 1, dtype=self.dtype, name='shortcut_conv2')(
      shifted[:, ::s, ::s]
    )
    y = jnp.concatenate([path1, path2], axis=-1)
    return layers.batch_norm(train, dtype=self.dtype, name='shortcut_bn')(y)


BACKBONES = {
  'shake_shake26_2x64d': functools.partial(ShakeShake, depth=26, base_width=64),
  'shake_shake26_2x96d': functools.partial(ShakeShake, depth=26, base_width=96),
  # A tiny one for tests: one block per stage, widths 4, 8, 16 (56 gated filters).
  'shake_shake8_2x4d': functools.partial(ShakeShake, depth=8, base_width=4),
}
