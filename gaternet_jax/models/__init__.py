"""Model registry: backbone names -> constructors, and `create_model(config)`."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from gaternet_jax.errors import UserError
from gaternet_jax.models.gater import Gater
from gaternet_jax.models.gaternet import Classifier, GaterNet
from gaternet_jax.layout import GatedLayer, total_filters
from gaternet_jax.models import densenet, inception_v4, pruning as pruning_lib, shake_shake
from gaternet_jax.models.resnet import ResNet
from gaternet_jax.models.resnet_cifar import CifarResNet

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
for _depth in (8, 14, 20, 32, 44, 56, 110):
  BACKBONES[f'cifar_resnet{_depth}'] = functools.partial(CifarResNet, depth=_depth)
for _depth in (164, 1001):
  BACKBONES[f'cifar_resnet{_depth}'] = functools.partial(CifarResNet, depth=_depth, bottleneck=True)
for _depth in (18, 34, 50, 101, 152):
  BACKBONES[f'resnet{_depth}'] = functools.partial(ResNet, depth=_depth)
# The backbones `gaternet export` can prune (their units take a models/pruning.py plan).
PRUNABLE = tuple(sorted(BACKBONES))
# Table 2's CIFAR backbones and Inception-v4 register their own names.
for _module in (densenet, shake_shake, inception_v4):
  BACKBONES.update(_module.BACKBONES)


def create_backbone(
  name: str,
  *,
  num_classes: int,
  width: float = 1.0,
  se_reduction: int = 0,
  include_head: bool = True,
  dtype: Any = jnp.float32,
  pruning: pruning_lib.Pruning | None = None,
) -> nn.Module:
  """A registered backbone by name; unknown names raise UserError listing the known ones.

  `pruning` (an export's channel plan) is accepted by the backbones in `PRUNABLE` only.
  """
  if name not in BACKBONES:
    raise UserError(f'unknown model name {name!r}; known: {", ".join(sorted(BACKBONES))}')
  extra = {}
  if pruning is not None:
    if name not in PRUNABLE:
      raise UserError(f'{name} cannot be pruned by export; these can: {", ".join(PRUNABLE)}')
    extra['pruning'] = pruning
  return BACKBONES[name](
    num_classes=num_classes,
    width=width,
    se_reduction=se_reduction,
    include_head=include_head,
    dtype=dtype,
    **extra,
  )


def backbone_from_config(config, *, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """`config.model`'s backbone, under its export plan (`model.pruning`) when it has one."""
  m = config.model
  return create_backbone(
    m.backbone,
    num_classes=num_classes,
    width=m.width,
    se_reduction=m.se_reduction,
    dtype=dtype,
    pruning=pruning_lib.from_config(m.get('pruning')),
  )


def gate_layout(config, image_shape) -> list[GatedLayer]:
  """The gated layers of `config.model.backbone` for images of `image_shape` (H, W, C)."""
  return backbone_from_config(config, num_classes=1).gate_layout(tuple(image_shape))


def create_model(config, *, num_classes: int, image_shape, dtype: Any = jnp.float32) -> nn.Module:
  """The model a config describes: a Classifier, or a GaterNet when `config.model.gated`.

  Args:
    config: an experiment config (uses `config.model` and `config.gater`).
    num_classes: classifier outputs of the backbone.
    image_shape: (H, W, C) of the inputs; fixes the gate layout's compute costs.
    dtype: computation dtype (bfloat16 under `half_precision`).
  """
  backbone = backbone_from_config(config, num_classes=num_classes, dtype=dtype)
  if not config.model.gated:
    return Classifier(backbone)
  layout = backbone.gate_layout(tuple(image_shape))
  g = config.gater
  extractor = create_backbone(
    g.extractor, num_classes=num_classes, width=g.extractor_width, include_head=False, dtype=dtype
  )
  gater = Gater(
    extractor,
    num_gates=total_filters(layout),
    bottleneck=g.bottleneck,
    init_bias=g.init_bias,
    dtype=dtype,
  )
  return GaterNet(backbone, gater)
