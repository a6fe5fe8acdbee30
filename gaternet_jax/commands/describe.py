"""Abstract model statistics: parameter counts, gated filters, multiply-accumulates.

Everything is computed with `jax.eval_shape`, so no parameter is ever materialized: ResNet-152-Gated
is described in seconds on a CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gaternet_jax import configs, models
from gaternet_jax.data import embedded
from gaternet_jax.gating.local import MODULE_NAME as LOCAL_GATE_MODULE
from gaternet_jax.layout import total_filters

# The numbers `gaternet describe --json` prints, in order.
SUMMARY_KEYS = (
  'backbone_params',
  'gater_params',
  'total_params',
  'gated_filters',
  'backbone_macs',
  'gater_macs',
)


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract) pytree."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def gating_owner(path: tuple[str, ...]) -> str:
  """'gater' for the gating computation (the GaterNet's gater, or a unit's local gating module
  `<unit>/gate`), else the top-level submodule's name."""
  if not path:
    return ''
  return 'gater' if path[0] == 'gater' or LOCAL_GATE_MODULE in path[1:] else path[0]


def split_params(params: Any) -> dict[str, int]:
  """Parameter counts by `gating_owner` of each leaf's path."""
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    owner = gating_owner(tuple(str(getattr(k, 'key', k)) for k in path))
    counts[owner] = counts.get(owner, 0) + math.prod(leaf.shape)
  return counts


def abstract_variables(model: nn.Module, image_shape) -> Any:
  """The model's variables as ShapeDtypeStructs, without running any initializer."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  rngs = {'params': jax.random.key(0), 'gates': jax.random.key(1)}
  return jax.eval_shape(functools.partial(model.init, train=False), rngs, x)


def count_macs(model: nn.Module, variables: Any, image_shape) -> dict[str, int]:
  """Forward multiply-accumulates per image of every Conv and Dense, by top-level submodule.

  A method interceptor records each layer's input and output shapes while the forward pass is
  traced abstractly; the MACs of a convolution are kernel area x input channels / groups x output
  elements, those of a dense layer input x output features. Local gating modules count as
  'gater' (`gating_owner`).
  """
  macs: dict[str, int] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      inputs = args[0]
      if isinstance(module, nn.Conv):
        per_output = math.prod(module.kernel_size) * inputs.shape[-1] // module.feature_group_count
      else:
        per_output = inputs.shape[-1]
      owner = gating_owner(tuple(module.path))
      macs[owner] = macs.get(owner, 0) + per_output * math.prod(out.shape[1:])
    return out

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  return macs


def describe(config, *, num_classes: int, image_shape) -> dict[str, Any]:
  """Parameter counts, gated filters and MACs of the model a config describes.

  Returns:
    A dict with `backbone_params`, `gater_params`, `total_params`, `gated_filters`,
    `backbone_macs` and `gater_macs` (per image), plus `gate_layout` (list of [name, filters]).
    `gater_*` is the gating computation: the GaterNet's gater, or a locally gated model's gating
    modules (which are then not in `backbone_*`).
  """
  model = models.create_model(config, num_classes=num_classes, image_shape=image_shape)
  variables = abstract_variables(model, image_shape)
  params = variables['params']
  macs = count_macs(model, variables, image_shape)
  layout = models.gate_layout(config, image_shape) if config.model.gated else []
  owners = split_params(params)
  return {
    'backbone_params': owners.get('backbone', 0),
    'gater_params': owners.get('gater', 0),
    'total_params': count_params(params),
    'gated_filters': total_filters(layout),
    'backbone_macs': macs.get('backbone', 0),
    'gater_macs': macs.get('gater', 0),
    'gate_layout': [[layer.name, layer.filters] for layer in layout],
  }


def gated_macs_per_filter(config, image_shape) -> np.ndarray:
  """MACs each gated filter costs per image, in gate-vector order (for compute-used analysis)."""
  layout = models.gate_layout(config, image_shape)
  return np.concatenate([np.full(l.filters, l.macs_per_filter, np.int64) for l in layout])


def mean_macs_used(stats: dict[str, Any], layout, gate_counts: np.ndarray, examples: int) -> float:
  """Mean MACs per image actually used: the gater, and every backbone filter except gated ones
  while their gate is off.

  Args:
    stats: `describe`'s dict of the model (its `backbone_macs` compute every filter).
    layout: the model's gate layout.
    gate_counts: (c,) for each gate, the examples it was on for.
    examples: how many examples `gate_counts` counts over.
  """
  used = float(stats['backbone_macs'] + stats['gater_macs'])
  counts = np.asarray(gate_counts, np.float64)
  start = 0
  for layer in layout:
    on = counts[start : start + layer.filters].sum() / max(examples, 1)
    used -= layer.macs_per_filter * (layer.filters - on)
    start += layer.filters
  if start != len(counts):
    raise ValueError(f'{len(counts)} gate counts for a layout of {start} gates')
  return used


def plain_backbone_config(config):
  """The config of the unpruned, ungated backbone a (gated or exported) config is built on."""
  plain = config.copy_and_resolve_references()
  with plain.unlocked():
    plain.model.gated = False
    if 'pruning' in plain.model:
      del plain.model['pruning']
  return plain


# Shapes and class counts of the datasets whose layout is known without reading them.
KNOWN_DATASETS = {
  embedded.NAME: (embedded.NUM_CLASSES, embedded.IMAGE_SHAPE),
  'cifar10': (10, (32, 32, 3)),
  'cifar100': (100, (32, 32, 3)),
}


def dataset_spec(data_config) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, image_shape) of `config.data`, without loading the dataset when possible."""
  if data_config.name in KNOWN_DATASETS:
    return KNOWN_DATASETS[data_config.name]
  if data_config.name == 'imagenet2012':
    return 1000, (data_config.image_size, data_config.image_size, 3)
  from gaternet_jax import data  # noqa: PLC0415 - an image folder must be read

  info = data.load_dataset(data_config).info
  return info.num_classes, info.image_shape


def summary(config) -> dict[str, int]:
  """`SUMMARY_KEYS` of the model a config describes, its dataset's shape known or read."""
  num_classes, image_shape = dataset_spec(config.data)
  stats = describe(config, num_classes=num_classes, image_shape=image_shape)
  return {k: stats[k] for k in SUMMARY_KEYS}


def format_text(config, stats: dict[str, int]) -> str:
  """The human-readable form of `summary`."""
  num_classes, image_shape = dataset_spec(config.data)
  rows = [
    ('backbone parameters', stats['backbone_params']),
    ('gater parameters', stats['gater_params']),
    ('total parameters', stats['total_params']),
    ('gated filters', stats['gated_filters']),
    ('backbone MACs/image', stats['backbone_macs']),
    ('gater MACs/image', stats['gater_macs']),
  ]
  lines = [
    f'{config.name} ({configs.variant_of(config)}): backbone {config.model.backbone}, '
    f'{num_classes} classes, input {"x".join(map(str, image_shape))}'
  ]
  for label, value in rows:
    line = f'  {label:<19} {value:>14,}'
    if label == 'total parameters':
      line += f'  ({value / 1e6:.2f}M)'
    elif 'MACs' in label:
      line += f'  ({value / 1e6:.1f}M)'
    lines.append(line)
  return '\n'.join(lines)
