"""Model registry: backbone names -> constructors, and `create_model(config)`."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from gaternet_jax import configs, legacy
from gaternet_jax.errors import UserError
from gaternet_jax.layout import GatedLayer, total_filters
from gaternet_jax.models import densenet, inception_v4, shake_shake
from gaternet_jax.models import pruning as pruning_lib
from gaternet_jax.models.gater import Gater
from gaternet_jax.models.gaternet import Classifier, GaterNet, LocallyGated
from gaternet_jax.models.resnet import ResNet
from gaternet_jax.models.resnet_cifar import CifarResNet

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
for _depth in (8, 14, 20, 32, 44, 56, 110):
  BACKBONES[f'cifar_resnet{_depth}'] = functools.partial(CifarResNet, depth=_depth)
for _depth in (11, 164, 1001):  # 11: one unit per stage, a tiny one for tests
  BACKBONES[f'cifar_resnet{_depth}'] = functools.partial(CifarResNet, depth=_depth, bottleneck=True)
for _depth in (18, 34, 50, 101, 152):
  BACKBONES[f'resnet{_depth}'] = functools.partial(ResNet, depth=_depth)
# The backbones `gaternet export` can prune (their units take a models/pruning.py plan), and the
# ones that can be gated locally (their units gate their first convolution from a LocalGates):
# the ResNets, whose four unit types do both.
PRUNABLE = tuple(sorted(BACKBONES))
LOCALLY_GATEABLE = PRUNABLE
# Table 2's CIFAR backbones and Inception-v4 register their own names.
for _module in (densenet, shake_shake, inception_v4):
  BACKBONES.update(_module.BACKBONES)
# The backbones with strided convolutions whose padding is a choice (layers.STRIDED_PADDINGS):
# the ResNets and Shake-Shake. DenseNet-BC downsamples by average pooling and Inception-v4's
# strided convolutions are 'VALID' in the original, so those two have nothing to choose.
STRIDED_PADDING_CHOICE = (*PRUNABLE, *shake_shake.BACKBONES)


def create_backbone(
  name: str,
  *,
  num_classes: int,
  width: float = 1.0,
  se_reduction: int = 0,
  include_head: bool = True,
  dtype: Any = jnp.float32,
  pruning: pruning_lib.Pruning | None = None,
  gate_placement: str = 'last',
  strided_padding: str = 'symmetric',
) -> nn.Module:
  """A registered backbone by name; unknown names raise UserError listing the known ones.

  `pruning` (an export's channel plan) is accepted by the backbones in `PRUNABLE` only;
  `gate_placement='first'` (local gating) by those in `LOCALLY_GATEABLE` only;
  `strided_padding` is used by those in `STRIDED_PADDING_CHOICE` (the others have one way).
  """
  if name not in BACKBONES:
    raise UserError(f'unknown model name {name!r}; known: {", ".join(sorted(BACKBONES))}')
  extra = {}
  if pruning is not None:
    if name not in PRUNABLE:
      raise UserError(f'{name} cannot be pruned by export; these can: {", ".join(PRUNABLE)}')
    extra['pruning'] = pruning
  if gate_placement != 'last':
    if name not in LOCALLY_GATEABLE:
      raise UserError(
        f'{name} cannot be gated locally (gating.method=local); these can: '
        f'{", ".join(LOCALLY_GATEABLE)}'
      )
    extra['gate_placement'] = gate_placement
  if name in STRIDED_PADDING_CHOICE:
    extra['strided_padding'] = strided_padding
  return BACKBONES[name](
    num_classes=num_classes,
    width=width,
    se_reduction=se_reduction,
    include_head=include_head,
    dtype=dtype,
    **extra,
  )


def strided_padding_of(config) -> str:
  """`model.strided_padding`; a config saved before the field existed used 'same'."""
  return legacy.field(config, 'model.strided_padding')


def backbone_from_config(config, *, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """`config.model`'s backbone, under its export plan (`model.pruning`) when it has one, gated
  on its units' first convolutions when the config gates locally."""
  m = config.model
  return create_backbone(
    m.backbone,
    num_classes=num_classes,
    width=m.width,
    se_reduction=m.se_reduction,
    dtype=dtype,
    pruning=pruning_lib.from_config(m.get('pruning')),
    gate_placement='first' if is_local(config) else 'last',
    strided_padding=strided_padding_of(config),
  )


def with_unit_skipping(model: nn.Module) -> nn.Module:
  """A GaterNet whose backbone, in evaluation, skips every unit whose gates are all off for the
  whole batch: the same outputs, less work when an image leaves units off (batch 1 above all).
  ResNet backbones only (models/units.skip_if_all_off)."""
  if not isinstance(model, GaterNet):
    raise UserError('skipping off units needs a GaterNet (gater and gated backbone)')
  if not hasattr(model.backbone, 'skip_off_units'):
    raise UserError(f'skipping off units works on the ResNet backbones ({", ".join(PRUNABLE)})')
  return model.clone(backbone=model.backbone.clone(skip_off_units=True))


def is_local(config) -> bool:
  """Whether a config's model is gated locally (Batch-Shaping's gating modules), or is the
  export of such a model (its plan then prunes the units' first convolutions)."""
  method = configs.gating_of(config).method
  if method not in configs.GATING_METHODS:
    raise UserError(
      f'config field gating.method must be one of {", ".join(configs.GATING_METHODS)}, '
      f'got {method!r}'
    )
  return method == 'local' and (bool(config.model.gated) or bool(config.model.get('pruning')))


def gate_layout(config, image_shape) -> list[GatedLayer]:
  """The gated layers of `config.model.backbone` for images of `image_shape` (H, W, C)."""
  return backbone_from_config(config, num_classes=1).gate_layout(tuple(image_shape))


def create_model(config, *, num_classes: int, image_shape, dtype: Any = jnp.float32) -> nn.Module:
  """The model a config describes: a Classifier, or when `config.model.gated` a GaterNet
  (`gating.method='gaternet'`) or a LocallyGated backbone (`'local'`).

  Args:
    config: an experiment config (uses `config.model` and `config.gater`).
    num_classes: classifier outputs of the backbone.
    image_shape: (H, W, C) of the inputs; fixes the gate layout's compute costs.
    dtype: computation dtype (bfloat16 under `half_precision`).
  """
  backbone = backbone_from_config(config, num_classes=num_classes, dtype=dtype)
  if not config.model.gated:
    return Classifier(backbone)
  gating = configs.gating_of(config)
  if is_local(config):
    return LocallyGated(
      backbone,
      binarizer=gating.binarizer,
      temperature=gating.temperature,
      hidden=gating.module_hidden,
      init_bias=gating.module_init_bias,
    )
  layout = backbone.gate_layout(tuple(image_shape))
  g = config.gater
  extractor = create_backbone(
    g.extractor,
    num_classes=num_classes,
    width=g.extractor_width,
    include_head=False,
    dtype=dtype,
    strided_padding=strided_padding_of(config),
  )
  gater = Gater(
    extractor,
    num_gates=total_filters(layout),
    bottleneck=g.bottleneck,
    init_bias=g.init_bias,
    dtype=dtype,
  )
  return GaterNet(backbone, gater, binarizer=gating.binarizer, temperature=gating.temperature)
