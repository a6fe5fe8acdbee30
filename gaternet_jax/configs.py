"""Building blocks for the experiment configs in `experiments/`.

Every experiment file defines `get_config(arg)` and returns `base_config(...)` filled in for its
dataset and backbone; `arg` (what follows the colon in `--config experiments/x.py:wider`) picks the
variant. Only choices live in a config: values derived from them (steps per epoch, total steps, the
number of gated filters) are computed in code, so `--config.<field>=` overrides never leave a stale
number behind.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from gaternet_jax.errors import UserError

VARIANTS = ('plain', 'wider', 'se', 'gated', 'bas', 'gaternet_bas')
# The variants with gates: GaterNet ('gated'), Batch-Shaping's locally gated units ('bas'), and a
# GaterNet trained with the batch-shaping loss too ('gaternet_bas', which neither paper ran).
GATED_VARIANTS = ('gated', 'bas', 'gaternet_bas')
GATING_METHODS = ('gaternet', 'local')
GATE_LOSSES = ('l1', 'l0', 'batch_shaping')
# How strided convolutions pad (models/layers.py says what each means): 'symmetric' as the original
# implementations, 'same' as TensorFlow's SAME.
STRIDED_PADDINGS = ('symmetric', 'same')

BATCH_SHAPING_REDUCTIONS = ('sum', 'mean')


def parse_variant(arg: str | None, default: str = 'gated') -> str:
  """The variant named by a config string (`''`/None -> `default`)."""
  variant = (arg or default).strip().lower()
  if variant not in VARIANTS:
    raise UserError(f'unknown variant {variant!r}; choose one of {", ".join(VARIANTS)}')
  return variant


def base_config(
  *,
  name: str,
  variant: str,
  dataset: str,
  backbone: str,
  extractor: str,
  bottleneck: int,
  wider_width: float,
  se_reduction: int,
) -> ml_collections.ConfigDict:
  """A complete config with the model fields for `variant`; training fields get CIFAR defaults.

  Args:
    name: the experiment's name (reported in results.json and tables).
    variant: 'plain', 'wider', 'se' or 'gated'.
    dataset: `data.name`.
    backbone: registered backbone name (see `gaternet_jax.models.BACKBONES`).
    extractor: registered name of the gater's feature extractor.
    bottleneck: the gater's FC bottleneck size b.
    wider_width: channel multiplier of the -Wider variant (chosen so its parameter count matches
      the paper's Wider row).
    se_reduction: SE reduction ratio of the -SE variant (chosen likewise).
  """
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.backbone = backbone
  c.model.width = wider_width if variant == 'wider' else 1.0
  c.model.se_reduction = se_reduction if variant == 'se' else 0
  c.model.gated = variant in GATED_VARIANTS
  # Symmetric, as He et al.'s and Gastaldi's code: a strided branch and its shortcut see the same
  # pixels ('same', TF's padding, centres them one pixel apart; runs before 2026-12-05 used it).
  c.model.strided_padding = 'symmetric'

  c.gater = ml_collections.ConfigDict()
  c.gater.extractor = extractor
  c.gater.extractor_width = 1.0
  c.gater.bottleneck = bottleneck
  c.gater.init_bias = 1.0  # see models/gater.py: every gate starts open
  c.gater.dropout_rate = 0.0  # final rate of scheduled dropout on the gates (appendix B: 0.05)

  c.gating = gating_config(variant)

  c.data = ml_collections.ConfigDict()
  c.data.name = dataset
  c.data.data_dir = config_dict.placeholder(str)
  c.data.eval_split = 'test'
  c.data.holdout = 0  # training examples held out as split 'holdout' (the paper: 5000)
  c.data.holdout_seed = 0
  c.data.image_size = 224  # ImageNet crop size; in-memory datasets keep their own size
  c.data.shuffle_buffer = 16_384
  c.data.crop_padding = 4  # on-device augmentation of in-memory datasets: pad-and-crop, flip
  c.data.augment = True

  # The original recipe of CIFAR ResNets (He et al. 2016): SGD with momentum 0.9, batch 128,
  # learning rate 0.1 divided by 10 at 50% and 75% of training, weight decay 1e-4, 164 epochs.
  c.batch_size = 128  # global
  c.eval_batch_size = 512  # global; a power of two, so that any slice of 2^k devices divides it
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.learning_rate = 0.1  # for `base_batch_size`; scaled linearly with batch_size
  c.optimizer.base_batch_size = 128
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'step'  # 'step' | 'cosine' | 'constant'
  c.schedule.num_epochs = 164.0
  c.schedule.warmup_epochs = 0.0
  c.schedule.boundaries = (0.5, 0.75)  # fractions of training, for 'step'
  c.schedule.decay_factor = 0.1
  c.max_steps = config_dict.placeholder(int)  # caps the total steps (smoke tests); None = epochs

  # The paper's procedure (section 4.4), used when model.gated: stage 1 trains the plain backbone,
  # stage 2 the gater's extractor as a classifier, stage 3 the GaterNet initialised from both.
  c.procedure = ml_collections.ConfigDict()
  c.procedure.pretrain = True  # False: train the GaterNet from scratch in one stage
  c.procedure.pretrain_epochs = config_dict.placeholder(float)  # None = schedule.num_epochs
  c.procedure.joint_extra_epochs = 0.0  # the paper adds 20 (DenseNet) / 30 (Shake-Shake)
  c.procedure.joint_learning_rate = config_dict.placeholder(float)  # None = optimizer's
  c.init = ml_collections.ConfigDict()
  c.init.backbone = config_dict.placeholder(str)  # a workdir whose checkpoint replaces stage 1
  c.init.gater = config_dict.placeholder(str)  # a workdir whose checkpoint replaces stage 2

  c.half_precision = False  # bfloat16 compute; parameters and BN statistics stay float32
  c.log_every_steps = 100
  # Training steps per jitted call on device-resident data (None: the platform's default, see
  # training/dispatch.py); results are the same at any value, only the speed changes.
  c.steps_per_dispatch = config_dict.placeholder(int)
  c.eval_every_epochs = 4.0
  c.checkpoint_every_steps = 1000
  # Seconds at least between two periodic checkpoints (None: the platform's default, see
  # checkpoints.min_interval_s); the last step and a stop by SIGTERM/Ctrl-C are always saved.
  c.checkpoint_min_interval_s = config_dict.placeholder(float)
  c.keep_checkpoints = 3
  return c


def gating_config(variant: str = 'gated') -> ml_collections.ConfigDict:
  """How a gated model gates and what shapes its gates (`config.gating`).

  GaterNet's recipe (variant 'gated'): the global gater, SemHash, the L1 term (its weight is
  `l1_weight`, the paper's lambda). Batch-Shaping's ('bas'): a gating module in every unit gating its first
  convolution, the Gumbel-sigmoid, the batch-shaping loss then L0. 'gaternet_bas': GaterNet's
  recipe plus the batch-shaping loss. Every method x binarizer x loss combination trains; the
  loss weights follow schedules over each run's training (fractions, like `schedule.boundaries`,
  so a shorter run keeps the recipe's shape; the paper's 500-epoch CIFAR-10 run: BaS decays to 0
  by epoch 100, L0 starts at epoch 100 and ramps to epoch 300).
  """
  # Lazy: importing this module must not import JAX (validation reads VARIANTS).
  from gaternet_jax.gating import batch_shaping, gumbel  # noqa: PLC0415

  epochs = batch_shaping.CIFAR10_EPOCHS
  g = ml_collections.ConfigDict()
  g.method = 'local' if variant == 'bas' else 'gaternet'  # one of GATING_METHODS
  g.binarizer = 'gumbel' if variant == 'bas' else 'semhash'  # or 'semhash' / 'gumbel'
  # Comma-separated names from GATE_LOSSES, each added to the cross-entropy with its weight.
  g.losses = {'bas': 'batch_shaping,l0', 'gaternet_bas': 'l1,batch_shaping'}.get(variant, 'l1')
  # lambda of the L1 term (eq. 5; the paper does not give its value). Beside the other gate-loss
  # weights: it weighs local gating's gates too, which have no gater (runs before 2026-12-05
  # stored it as gater.l1_weight; legacy.RENAMED_FIELDS).
  g.l1_weight = 0.1
  g.temperature = gumbel.GUMBEL_TEMPERATURE  # Gumbel-sigmoid temperature (gradient only)
  g.module_hidden = batch_shaping.GATE_HIDDEN_UNITS  # local gating modules' FC1 width
  # Their FC2 bias at the start: 0 (P(on) = 1/2), as the CIFAR-10 recipe's script leaves the
  # framework's default (mean 0); runs before 2026-12-05 stored 1.0 (P(on) = 0.73).
  g.module_init_bias = 0.0
  # Weight decay on the gating modules: off, as the recipe's script (it would pull every gate's
  # logit towards a fixed value, whatever the input). Runs saved before: on (legacy.py).
  g.module_weight_decay = False
  g.batch_shaping_weight = batch_shaping.BATCH_SHAPING_WEIGHT  # gamma at the start
  # How gamma weighs the gates: 'sum' of every gate's loss over the whole network (the recipe's
  # gamma = 0.75 multiplies that sum; gating/batch_shaping.py), or their 'mean' (the authors'
  # loss function alone; C times weaker; runs before 2026-12-05).
  g.batch_shaping_reduction = 'sum'
  g.batch_shaping_end = batch_shaping.BATCH_SHAPING_END_EPOCH / epochs  # decayed to 0 here
  g.prior_a = batch_shaping.BETA_PRIOR_A  # the Beta(a, b) prior of the batch-shaping loss
  g.prior_b = batch_shaping.BETA_PRIOR_B
  # The final L0 weight is the accuracy-vs-compute knob (the paper sweeps it); 0.1 is ours.
  g.l0_weight = 0.1
  g.l0_start = batch_shaping.L0_START_EPOCH / epochs  # L0 off before this fraction of training
  g.l0_ramp_end = batch_shaping.L0_RAMP_END_EPOCH / epochs  # full L0 weight from here on
  return g


def variant_of(config) -> str:
  """The variant a config trains ('plain', 'wider', 'se', 'gated', 'bas', 'gaternet_bas'), read
  from the fields that decide it. Never stored: whether a model is gated is said once
  (`model.gated`; how, by `gating`), so no override can make a label disagree with the model."""
  model = config.model
  if model.gated:
    if gating_of(config).method == 'local':
      return 'bas'
    return 'gaternet_bas' if 'batch_shaping' in gate_losses(config) else 'gated'
  if model.get('se_reduction'):
    return 'se'
  return 'wider' if model.get('width', 1.0) != 1.0 else 'plain'


def gating_of(config) -> ml_collections.ConfigDict:
  """`config.gating`, or GaterNet's recipe for a run saved before the section existed."""
  gating = config.get('gating') if hasattr(config, 'get') else None
  return gating if gating is not None else gating_config('gated')


GATE_LOSSES_RULE = f'must be distinct names from {", ".join(GATE_LOSSES)} separated by commas'


def parse_gate_losses(text: str) -> tuple[str, ...]:
  """The names in a `gating.losses` string ('' for none).

  Raises:
    UserError: an unknown or repeated name.
  """
  names = tuple(n.strip() for n in str(text).split(',') if n.strip())
  if any(n not in GATE_LOSSES for n in names) or len(set(names)) != len(names):
    raise UserError(f'config field gating.losses {GATE_LOSSES_RULE}, got {text!r}')
  return names


def gate_losses(config) -> tuple[str, ...]:
  """The gate losses a config trains with: `gating.losses` for a gated model, none else."""
  if not config.model.gated:
    return ()
  return parse_gate_losses(gating_of(config).losses)


def cifar_config(
  dataset: str, depth: int, arg: str | None, *, wider_width: float, se_reduction: int
) -> ml_collections.ConfigDict:
  """A Table 1 row: ResNet-`depth` on CIFAR-10/100 with a ResNet-20 gater (b = 8)."""
  variant = parse_variant(arg)
  c = base_config(
    name=f'{dataset}_resnet{depth}',
    variant=variant,
    dataset=dataset,
    backbone=f'cifar_resnet{depth}',
    extractor='cifar_resnet20',
    bottleneck=8,
    wider_width=wider_width,
    se_reduction=se_reduction,
  )
  if depth >= 110:
    # He et al. warm up ResNet-110/164 at a lower learning rate for ~400 iterations before 0.1;
    # a linear ramp over the first epoch (~350 steps at batch 128) plays that role here.
    c.schedule.warmup_epochs = 1.0
  return c


def table2_variant(arg: str | None, backbone: str) -> str:
  """`plain` or `gated`: Table 2's backbones have no -Wider or -SE rows in the paper."""
  variant = parse_variant(arg)
  if variant not in ('plain', 'gated'):
    raise UserError(f'{backbone} has no {variant!r} variant in the paper; choose plain or gated')
  return variant


def _table2_config(backbone: str, variant: str) -> ml_collections.ConfigDict:
  """A Table 2 row's common part: CIFAR-10, named after its backbone, a ResNet-20 gater (b=8)."""
  return base_config(
    name=f'cifar10_{backbone}',
    variant=variant,
    dataset='cifar10',
    backbone=backbone,
    extractor='cifar_resnet20',
    bottleneck=8,
    wider_width=1.0,
    se_reduction=0,
  )


def densenet_config(depth: int, growth: int, arg: str | None) -> ml_collections.ConfigDict:
  """A Table 2 DenseNet-BC (L=depth, k=growth) row on CIFAR-10 with a ResNet-20 gater (b=8).

  The original recipe (Huang et al. 2017): 300 epochs, batch 64, SGD with Nesterov momentum 0.9,
  learning rate 0.1 divided by 10 at 50% and 75%, weight decay 1e-4; the gated model adds the
  paper's changes (section 4.4, appendix B): 20 more joint epochs, joint learning rate 0.05, and
  scheduled dropout on the gates reaching 0.05 (they act only when model.gated).
  """
  c = _table2_config(f'densenet_bc{depth}_k{growth}', table2_variant(arg, 'DenseNet-BC'))
  c.batch_size = 64
  c.optimizer.base_batch_size = 64
  c.optimizer.nesterov = True
  c.schedule.num_epochs = 300.0
  c.procedure.joint_extra_epochs = 20.0
  c.procedure.joint_learning_rate = 0.05
  c.gater.dropout_rate = 0.05
  return c


def shake_shake_config(base_width: int, arg: str | None) -> ml_collections.ConfigDict:
  """A Table 2 Shake-Shake 26 2x(base_width)d row on CIFAR-10 with a ResNet-20 gater (b=8).

  The original recipe (Gastaldi 2017, "Shake-Shake-Image"): 1,800 epochs of SGD with Nesterov
  momentum 0.9 (its train.lua), batch 128, cosine learning rate from 0.2 to 0, weight decay 1e-4;
  the gated model adds 30 joint epochs at learning rate 0.05 and gate dropout reaching 0.05.
  """
  c = _table2_config(f'shake_shake26_2x{base_width}d', table2_variant(arg, 'Shake-Shake'))
  c.optimizer.learning_rate = 0.2
  c.optimizer.nesterov = True
  c.schedule.name = 'cosine'
  c.schedule.num_epochs = 1800.0
  c.procedure.joint_extra_epochs = 30.0
  c.procedure.joint_learning_rate = 0.05
  c.gater.dropout_rate = 0.05
  c.eval_every_epochs = 20.0  # 90 evaluations over 1,800 epochs
  return c


def imagenet_config(
  depth: int, arg: str | None, *, wider_width: float, bottleneck: int = 256
) -> ml_collections.ConfigDict:
  """A Table 3 row: ResNet-`depth` on ImageNet with a ResNet-18 gater."""
  variant = parse_variant(arg)
  c = base_config(
    name=f'imagenet_resnet{depth}',
    variant=variant,
    dataset='imagenet2012',
    backbone=f'resnet{depth}',
    extractor='resnet18',
    bottleneck=bottleneck,
    wider_width=wider_width,
    se_reduction=16,  # the SE paper's ratio; reproduces Table 3's SE rows
  )
  return imagenet_recipe(c)


def imagenet_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets a config's data and training fields to the ImageNet recipe; returns it."""
  c.data.eval_split = 'validation'
  # ImageNet recipe: batch 256 at learning rate 0.1, scaled linearly with the global batch;
  # 90 epochs, 5 warm-up epochs, cosine decay (set schedule.name='step' for /10 at 30/60/80).
  c.batch_size = 1024
  # A power of two, so every slice of a pod (8 to 1024 devices) divides it; the eval mask
  # scores the padded last batch exactly (1000 stopped any launch on 16+ devices).
  c.eval_batch_size = 1024
  c.optimizer.base_batch_size = 256
  c.schedule.name = 'cosine'
  c.schedule.num_epochs = 90.0
  c.schedule.warmup_epochs = 5.0
  c.schedule.boundaries = (1 / 3, 2 / 3, 8 / 9)
  c.half_precision = True
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 2000
  return c


BAS_VARIANTS = ('bas', 'gaternet_bas', 'plain')


def _bas_config(
  arg: str | None, *, name: str, dataset: str, backbone: str, extractor: str, bottleneck: int
) -> ml_collections.ConfigDict:
  """The common part of the Batch-Shaping configs: the variant, the model, from scratch."""
  variant = parse_variant(arg, default='bas')
  if variant not in BAS_VARIANTS:
    raise UserError(f'a _bas config has variants {", ".join(BAS_VARIANTS)}, got {variant!r}')
  c = base_config(
    name=name,
    variant=variant,
    dataset=dataset,
    backbone=backbone,
    extractor=extractor,
    bottleneck=bottleneck,
    wider_width=1.0,
    se_reduction=0,
  )
  c.procedure.pretrain = False  # Batch-Shaping trains the gated network from scratch
  return c


def bas_cifar_config(depth: int, arg: str | None) -> ml_collections.ConfigDict:
  """Batch-Shaping's CIFAR-10 recipe on ResNet-`depth` (variants: bas, gaternet_bas, plain).

  The recipe (UNVERIFIED against the paper's text, see gaternet_jax/gating/batch_shaping.py):
  trained from scratch for 500 epochs, batch 256, SGD with Nesterov momentum 0.9, learning rate
  0.1 divided by 10 at epochs 300, 375 and 450, weight decay 5e-4; gates from the unit-local
  gating modules with the Gumbel-sigmoid; the batch-shaping loss (Beta(0.6, 0.4), weight 0.75
  decaying to 0 by epoch 100), then L0 from epoch 100 ramping to epoch 300. 'gaternet_bas' puts
  the batch-shaping loss on a GaterNet (ResNet-20 gater, b = 8) with the same schedule.
  """
  from gaternet_jax.gating import batch_shaping  # noqa: PLC0415 (imports JAX)

  c = _bas_config(
    arg,
    name=f'cifar10_resnet{depth}_bas',
    dataset='cifar10',
    backbone=f'cifar_resnet{depth}',
    extractor='cifar_resnet20',
    bottleneck=8,
  )
  c.batch_size = 256
  c.optimizer.base_batch_size = 256
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  epochs = batch_shaping.CIFAR10_EPOCHS
  c.schedule.num_epochs = float(epochs)
  c.schedule.boundaries = (300 / epochs, 375 / epochs, 450 / epochs)
  c.eval_every_epochs = 10.0
  return c


def bas_imagenet_config(depth: int, arg: str | None) -> ml_collections.ConfigDict:
  """Batch-Shaping's gating on ImageNet ResNet-`depth` (variants: bas, gaternet_bas, plain).

  The paper's ImageNet recipe (epochs, loss weights and schedules) is not known here: this uses
  the ImageNet recipe of `imagenet_recipe` and the CIFAR recipe's loss schedule as fractions of
  training, from scratch; 'gaternet_bas' uses a ResNet-18 gater (b = 256) as Table 3 does.
  """
  c = _bas_config(
    arg,
    name=f'imagenet_resnet{depth}_bas',
    dataset='imagenet2012',
    backbone=f'resnet{depth}',
    extractor='resnet18',
    bottleneck=256,
  )
  return imagenet_recipe(c)


def flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for a (nested) ConfigDict or dict; tuples become lists (as in JSON)."""
  items = config.items() if hasattr(config, 'items') else []
  out = {}
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out
