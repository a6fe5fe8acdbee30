"""Table 2: Shake-Shake 26 2x64d on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_shake_shake26_2x64d.py:gated --workdir runs/ss64
The recipe is the original's (Gastaldi 2017, github.com/xgastaldi/shake-shake: "Shake-Shake-Image",
1,800 epochs of SGD with Nesterov momentum 0.9, batch 128, cosine learning rate from 0.2 to 0,
weight decay 1e-4), with the paper's changes for the gated model (sections 4.2.2, 4.4, appendix B).
The paper has no -Wider or -SE row for Shake-Shake, so those variants are refused.
"""

from gaternet_jax import configs
from gaternet_jax.errors import UserError


def shake_shake_config(base_width, arg):
  """The Table 2 Shake-Shake 26 2x(base_width)d row (also used by the 2x96d experiment)."""
  variant = configs.parse_variant(arg)
  if variant not in ('plain', 'gated'):
    raise UserError(
      f'Shake-Shake has no {variant!r} variant in the paper (Table 2); choose plain or gated'
    )
  c = configs.base_config(
    name=f'cifar10_shake_shake26_2x{base_width}d',
    variant=variant,
    dataset='cifar10',
    backbone=f'shake_shake26_2x{base_width}d',
    extractor='cifar_resnet20',  # "All our models are using ResNet-20 as the gater network."
    bottleneck=8,
    wider_width=1.0,
    se_reduction=0,
  )
  c.batch_size = 128
  c.optimizer.learning_rate = 0.2
  c.optimizer.base_batch_size = 128
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True  # the original's train.lua: nesterov = true, dampening = 0
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = 'cosine'  # no restarts (nCycles = 1), down to 0
  c.schedule.num_epochs = 1800.0
  c.schedule.warmup_epochs = 0.0
  # The paper's changes for Shake-Shake-Gated; they only act when model.gated. The joint stage
  # trains 30 more epochs at a smaller initial rate (section 4.4), and scheduled dropout on the
  # gates rises to 0.05 (appendix B).
  c.procedure.joint_extra_epochs = 30.0
  c.procedure.joint_learning_rate = 0.05
  c.gater.dropout_rate = 0.05
  c.eval_every_epochs = 20.0  # 90 evaluations over 1,800 epochs
  return c


def get_config(arg=None):
  return shake_shake_config(64, arg)
