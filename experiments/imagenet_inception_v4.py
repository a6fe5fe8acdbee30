"""Table 3: Inception-v4 on ImageNet 2012 (299x299) with a ResNet-18 gater; variants plain | gated.

Usage (one command, run on every host of a TPU pod or on one GPU machine):
  gaternet train --config experiments/imagenet_inception_v4.py \
    --workdir gs://bucket/imagenet_inception_v4

Optimiser: Szegedy et al. trained Inception-v4 with RMSProp (decay 0.9, epsilon 1.0, learning rate
0.045 decayed by 0.94 every 2 epochs), which this codebase's SGD-only optimizer cannot express. We
use the recipe of the ResNet configs instead (SGD with momentum 0.9, batch 1024 at learning rate 0.1
x 1024/256, 5 warm-up epochs, cosine decay over 90 epochs), the documented large-batch synchronous
recipe, keeping from TF-slim's Inception only its weight decay, 4e-5 (1e-4 is tuned for ResNets).
The gated model adds scheduled dropout on the gates reaching 0.05 (the paper's appendix B).
The paper has no -Wider or -SE row for Inception-v4; those variants are refused.
"""

from gaternet_jax import configs
from gaternet_jax.errors import UserError


def get_config(arg=None):
  variant = configs.parse_variant(arg)
  if variant not in ('plain', 'gated'):
    raise UserError(f'imagenet_inception_v4 has no {variant!r} variant; choose plain or gated')
  c = configs.base_config(
    name='imagenet_inception_v4',
    variant=variant,
    dataset='imagenet2012',
    backbone='inception_v4',
    extractor='resnet18',
    bottleneck=256,  # section 4.4
    wider_width=1.0,
    se_reduction=0,
  )
  configs.imagenet_recipe(c)  # the ResNet configs' ImageNet recipe, at Inception's 299x299 crop
  c.data.image_size = 299
  c.optimizer.weight_decay = 4e-5
  if variant == 'gated':
    c.gater.dropout_rate = 0.05
  return c
