"""Table 2: DenseNet-BC (L=250, k=24) on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_densenet_bc250_k24.py:gated \
         --workdir runs/cifar10_densenet_bc250_k24
Paper: plain 15.32M parameters, 3.61% error; gated 15.62M, 3.31%, with 2,880 gated filters and a
ResNet-20 gater (b = 8).
The original DenseNet recipe (Huang et al. 2017): 300 epochs, batch 64, SGD with Nesterov momentum
0.9, learning rate 0.1 divided by 10 at 50% and 75%, weight decay 1e-4. The gated model adds the
paper's changes (section 4.4, appendix B): 20 more joint epochs, joint learning rate 0.05, and
scheduled dropout on the gates reaching 0.05.
"""

from gaternet_jax import configs
from gaternet_jax.errors import UserError


def get_config(arg=None):
  variant = configs.parse_variant(arg)
  if variant not in ('plain', 'gated'):
    raise UserError(f'variant {variant!r}: Table 2 has only plain and gated DenseNet-BC rows')
  c = configs.base_config(
    name='cifar10_densenet_bc250_k24',
    variant=variant,
    dataset='cifar10',
    backbone='densenet_bc250_k24',
    extractor='cifar_resnet20',
    bottleneck=8,
    wider_width=1.0,
    se_reduction=0,
  )
  c.batch_size = 64
  c.optimizer.base_batch_size = 64
  c.optimizer.learning_rate = 0.1
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = 'step'
  c.schedule.num_epochs = 300.0
  c.schedule.boundaries = (0.5, 0.75)
  c.procedure.joint_extra_epochs = 20.0
  c.procedure.joint_learning_rate = 0.05
  c.gater.dropout_rate = 0.05
  return c
