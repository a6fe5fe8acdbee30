"""Table 1: ResNet-56 on CIFAR10; variants plain | wider | se | gated (default).

Usage: gaternet train --config experiments/cifar10_resnet56.py:gated --workdir runs/cifar10_resnet56
-Wider multiplies every layer's channels by 1.125 and -SE uses reduction 4: the values whose
parameter counts match the paper's Wider and SE rows.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.cifar_config('cifar10', 56, arg, wider_width=1.125, se_reduction=4)
