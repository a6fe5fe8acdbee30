"""Table 2: Shake-Shake 26 2x96d on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_shake_shake26_2x96d.py:gated --workdir runs/cifar10_shake_shake26_2x96d
Paper: plain 26.33M parameters, 2.82% error; gated 26.65M, 2.64%, with 5,376 gated filters and a
ResNet-20 gater (b = 8). The recipe (the original's, plus the paper's changes for the gated
model) is `configs.shake_shake_config`.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.shake_shake_config(96, arg)
