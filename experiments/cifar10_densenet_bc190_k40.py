"""Table 2: DenseNet-BC (L=190, k=40) on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_densenet_bc190_k40.py:gated --workdir runs/cifar10_densenet_bc190_k40
Paper: plain 25.62M parameters, 3.52% error; gated 25.93M, 3.39%, with 3,600 gated filters and a ResNet-20 gater (b = 8). The recipe
(the original's, plus the paper's changes for the gated model) is `configs.densenet_config`.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.densenet_config(190, 40, arg)
