"""Table 2: Shake-Shake 26 2x64d on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_shake_shake26_2x64d.py:gated --workdir runs/cifar10_shake_shake26_2x64d
Paper: plain 11.71M parameters, 3.05% error; gated 12.01M, 2.89%, with 3,584 gated filters and a
ResNet-20 gater (b = 8). The recipe (the original's, plus the paper's changes for the gated
model) is `configs.shake_shake_config`.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.shake_shake_config(64, arg)
