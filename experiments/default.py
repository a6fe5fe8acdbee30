"""The offline default: GaterNet on the embedded handwritten digits, minutes on a laptop CPU.

The data ship inside scikit-learn (1,797 8x8 digits, upsampled to 16x16; 1,500 train / 297 test),
so this runs anywhere with no download. The default variant is `gated`: the full procedure of the
paper (pre-train a ResNet-8 backbone and a ResNet-8 gater, then train them jointly). `:plain` is
the backbone alone.

  gaternet train --config experiments/default.py --workdir runs/default
"""

from gaternet_jax import configs


def get_config(arg=None):
  variant = configs.parse_variant(arg)
  c = configs.base_config(
    name='default',
    variant=variant,
    dataset='default',
    backbone='cifar_resnet8',
    extractor='cifar_resnet8',
    bottleneck=8,
    wider_width=1.4375,
    se_reduction=4,
  )
  c.data.crop_padding = 2
  c.batch_size = 100
  c.eval_batch_size = 100
  c.optimizer.learning_rate = 0.1
  c.optimizer.base_batch_size = 100
  c.schedule.name = 'cosine'
  c.schedule.num_epochs = 15.0
  c.schedule.warmup_epochs = 1.0
  c.gating.l1_weight = 1.0
  c.log_every_steps = 15
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 75
  return c
