"""Table 1: ResNet-20 on CIFAR100; variants plain | wider | se | gated (default).

Usage: gaternet train --config experiments/cifar100_resnet20.py:gated --workdir runs/cifar100_resnet20
-Wider multiplies every layer's channels by 1.4375 and -SE uses reduction 4: the values whose
parameter counts match the paper's Wider and SE rows.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.cifar_config('cifar100', 20, arg, wider_width=1.4375, se_reduction=4)
