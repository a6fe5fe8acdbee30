"""Table 2: DenseNet-BC (L=250, k=24) on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_densenet_bc250_k24.py:gated --workdir runs/cifar10_densenet_bc250_k24
Paper: plain 15.32M parameters, 3.61% error; gated 15.62M, 3.31%, with 2,880 gated filters and a ResNet-20 gater (b = 8). The recipe
(the original's, plus the paper's changes for the gated model) is `configs.densenet_config`.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.densenet_config(250, 24, arg)
