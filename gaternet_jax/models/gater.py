"""The gater G(x) = D(E(x)) of section 3.2: a feature extractor and an FC bottleneck to g'."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.models import layers


class Gater(nn.Module):
  """Maps an image to real-valued gate logits g' of shape (batch, num_gates).

  f = E(x); f' = FC1(f); g' = FC2(ReLU(BatchNorm(f'))), FC1: h -> b, FC2: b -> c.

  Attributes:
    extractor: a backbone built with `include_head=False` (ResNet-20 on CIFAR, ResNet-18 on
      ImageNet in the paper); its parameters live under `extractor` so a pre-trained classifier's
      parameters (minus its head) load into it directly.
    num_gates: c, the number of gated filters of the backbone.
    bottleneck: b (8 on CIFAR; 256 on ImageNet).
    init_bias: initial bias of FC2, with FC2's kernel initialised to zero. Joint training starts
      from a pre-trained backbone; zero kernel and a positive bias make every gate open (g' = bias >
      0, so g = 1 in evaluation, and with the training noise P(on) = Phi(bias)), so at step 0 the
      GaterNet computes exactly what the pre-trained backbone computes, instead of switching off a
      random half of its filters. Gates become input-dependent as FC2's kernel learns (its gradient
      is nonzero from the first step); FC1 learns once FC2's kernel is nonzero.
    dtype: computation dtype; the logits are returned in float32 for SemHash.
  """

  extractor: nn.Module
  num_gates: int
  bottleneck: int
  init_bias: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    features = self.extractor(x, train=train)
    h = nn.Dense(self.bottleneck, dtype=self.dtype, name='fc1')(features)
    h = nn.relu(layers.batch_norm(train, dtype=self.dtype, name='bn')(h))
    logits = nn.Dense(
      self.num_gates,
      dtype=self.dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.constant(self.init_bias),
      name='fc2',
    )(h)
    return logits.astype(jnp.float32)
