"""Table 2: DenseNet-BC (L=100, k=12) on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_densenet_bc100_k12.py:gated --workdir runs/cifar10_densenet_bc100_k12
Paper: plain 0.77M parameters, 4.48% error; gated 1.05M, 4.03%, with 540 gated filters and a ResNet-20 gater (b = 8). The recipe
(the original's, plus the paper's changes for the gated model) is `configs.densenet_config`.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.densenet_config(100, 12, arg)
