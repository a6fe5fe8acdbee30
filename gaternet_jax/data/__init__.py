"""Datasets: the embedded offline default, ImageFolder, and tfds sources (CIFAR, ImageNet).

Small datasets (`default`, `cifar10`, `cifar100`, `imagefolder`) are loaded whole as uint8 numpy
arrays (`Dataset.train_arrays`), meant to live on the device and be augmented inside the jitted
step (`augment`). ImageNet is streamed through tf.data (`Dataset.train_iterator`). Evaluation is
`Dataset.eval_iterator` for both: fixed-size batches with a mask, the same number on every
process.

Multi-host: every process calls `load_dataset` with its index and gets only its own share of
every split; the hold-out and the statistics are computed on the global training set, so all
processes agree on them.

Importing this package never imports TensorFlow; only the tfds sources do, when loaded.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gaternet_jax import errors
from gaternet_jax.data import augment, base
from gaternet_jax.data.base import Dataset, DatasetInfo, eval_batches

__all__ = [
  'Dataset',
  'DatasetInfo',
  'augment',
  'default_data_config',
  'eval_batches',
  'load_dataset',
  'NAMES',
]

NAMES = ('default', 'cifar10', 'cifar100', 'imagenet2012', 'imagefolder')

# Every field `load_dataset` reads, with its default.
_DEFAULTS: dict[str, Any] = {
  'name': 'default',
  'data_dir': None,
  'eval_split': 'test',
  'holdout': 0,
  'holdout_seed': 0,
  'image_size': 224,
  'shuffle_buffer': 16_384,
}


def default_data_config() -> ml_collections.ConfigDict:
  """A `config.data` with every field `load_dataset` reads, at its default value.

  `data_dir` is a placeholder that accepts a string later (`--config.data.data_dir=...`).
  """
  return ml_collections.ConfigDict(
    {**_DEFAULTS, 'data_dir': ml_collections.config_dict.placeholder(str)}
  )


def load_dataset(
  data_config: ml_collections.ConfigDict,
  *,
  process_index: int = 0,
  process_count: int = 1,
  devices_per_process: int = 1,
) -> Dataset:
  """Loads the dataset `data_config` names, keeping this process's share of every split.

  Args:
    data_config: the training config's `config.data`; fields `name`, `data_dir`, `eval_split`,
      `holdout`, `holdout_seed`, `image_size`, `shuffle_buffer` (a missing field takes the
      default of `default_data_config`).
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    devices_per_process: devices of each process (`jax.local_device_count()`); in-memory
      sources give each process the training examples its devices train on
      (`base.ProcessSlice.train_share`).

  Returns:
    The dataset. For in-memory sources process p holds examples [p::process_count] of each
    split (after the global hold-out); streamed sources use `tfds.split_for_jax_process`.

  Raises:
    DatasetNotFoundError: the data is not on this machine (nothing is ever downloaded).
    UserError: an unknown name, an impossible hold-out, a missing eval split, bad images.
  """
  get = lambda field: data_config.get(field, _DEFAULTS[field])
  name = get('name')
  data_dir = get('data_dir') or None
  part = base.ProcessSlice(
    holdout=int(get('holdout')),
    holdout_seed=int(get('holdout_seed')),
    process_index=process_index,
    process_count=process_count,
    devices_per_process=devices_per_process,
  )

  if name == 'default':
    from gaternet_jax.data import embedded  # pylint: disable=g-import-not-at-top

    dataset = embedded.load(part)
  elif name == 'imagefolder':
    from gaternet_jax.data import imagefolder  # pylint: disable=g-import-not-at-top

    dataset = imagefolder.load(data_dir, part)
  elif name in ('cifar10', 'cifar100'):
    from gaternet_jax.data import tfds_sources  # pylint: disable=g-import-not-at-top

    dataset = tfds_sources.load_cifar(name, data_dir, part)
  elif name == 'imagenet2012':
    from gaternet_jax.data import tfds_sources  # pylint: disable=g-import-not-at-top

    dataset = tfds_sources.load_streamed(
      name,
      data_dir,
      part,
      image_size=int(get('image_size')),
      shuffle_buffer=int(get('shuffle_buffer')),
    )
  else:
    raise errors.UserError(
      f"unknown dataset data.name='{name}'; known datasets: {', '.join(NAMES)}"
    )
  base.validate_eval_split(dataset.info, get('eval_split'))
  return dataset
