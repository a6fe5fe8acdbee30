"""Table 3: ResNet-152 on ImageNet 2012 with a ResNet-18 gater; variants plain | wider | se | gated.

Usage (one command, run on every host of a TPU pod or on one GPU machine):
  gaternet train --config experiments/imagenet_resnet152.py --workdir gs://bucket/imagenet_resnet152
-Wider multiplies every layer's channels by 1.1666667 (matches the paper's Wider parameter count).
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.imagenet_config(152, arg, wider_width=1.1666667)
