"""Table 1: ResNet-164 on CIFAR10; variants plain | wider | se | gated (default).

Usage: gaternet train --config experiments/cifar10_resnet164.py:gated --workdir runs/cifar10_resnet164
-Wider multiplies every layer's channels by 1.125 and -SE uses reduction 8: the values whose
parameter counts match the paper's Wider and SE rows.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.cifar_config('cifar10', 164, arg, wider_width=1.125, se_reduction=8)
