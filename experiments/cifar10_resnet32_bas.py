"""CIFAR-10 ResNet-32 with Batch-Shaping's channel-gated units (ICLR 2020).

Variants: `:bas` (default: unit-local gating modules, Gumbel-sigmoid, batch-shaping then L0),
`:gaternet_bas` (a GaterNet with the batch-shaping loss added), `:plain` (the same recipe,
no gates).
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.bas_cifar_config(32, arg)
