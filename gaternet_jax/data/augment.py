"""On-device augmentation for the in-memory datasets: pure jax.numpy, run inside the jitted step.

Keeping the uint8 dataset resident on the device and augmenting there removes the host input
pipeline entirely (see DESIGN.md, "Speed habits").
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, images: jax.Array, *, padding: int) -> jax.Array:
  """Pads, randomly crops and randomly mirrors each image (the standard CIFAR augmentation).

  Args:
    key: a PRNG key.
    images: (B, H, W, C), any dtype (uint8 in practice).
    padding: zero pixels added on every side before cropping back to H x W.

  Returns:
    (B, H, W, C) of the input dtype: each image an independent random H x W window of its
    padded version, mirrored left-right with probability 0.5.
  """
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    images = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))

  def crop_flip(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(crop_flip)(images, offsets, flips)


def normalize(
  images: jax.Array,
  mean: Sequence[float] | jax.Array,
  std: Sequence[float] | jax.Array,
  dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
  """(images - mean) / std per channel, computed in float32, returned as `dtype`.

  Args:
    images: (..., C) pixels, 0-255 scale.
    mean: per-channel mean, 0-255 scale (`DatasetInfo.mean`).
    std: per-channel standard deviation, 0-255 scale (`DatasetInfo.std`).
    dtype: output dtype (e.g. bfloat16 for half-precision compute).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
