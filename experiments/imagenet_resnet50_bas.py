"""ImageNet ResNet-50 with Batch-Shaping's channel-gated units (ICLR 2020).

Variants: `:bas` (default), `:gaternet_bas` (a GaterNet with the batch-shaping loss), `:plain`.
The paper's ImageNet loss schedule is not known here; see `configs.bas_imagenet_config`.
"""

from gaternet_jax import configs


def get_config(arg=None):
  return configs.bas_imagenet_config(50, arg)
