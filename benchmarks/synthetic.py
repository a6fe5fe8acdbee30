"""What the benchmark scripts share: a config from `path.py[:arg]`, and resident synthetic data.

Imported by the scripts in this folder (run as `python benchmarks/NAME.py`, so this folder is on
the import path); it is not part of the library.
"""

from __future__ import annotations

import importlib.util
from typing import Any, NamedTuple

import jax
import numpy as np

from gaternet_jax.commands import describe
from gaternet_jax.data.base import DatasetInfo, InMemoryDataset
from gaternet_jax.training import dispatch, steps


def load_config(spec: str):
  """`path.py:arg` -> the config, as `--config path.py:arg` would give it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def resident_dataset(config, examples: int, seed: int = 0):
  """`examples` random uint8 images and labels of the config's dataset shape, as an in-memory
  dataset (normalisation mean 127, std 64 per channel); returns (dataset, images, labels)."""
  num_classes, shape = describe.dataset_spec(config.data)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, (examples, *shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (examples,), dtype=np.int32)
  info = DatasetInfo(
    name='synthetic',
    num_classes=num_classes,
    image_shape=tuple(shape),
    mean=(127.0,) * shape[-1],
    std=(64.0,) * shape[-1],
    num_train=examples,
    split_sizes={},
    in_memory=True,
  )
  return InMemoryDataset(info, (images, labels), {}, process_count=1), images, labels


def variant_config(
  config,
  variant: str,
  *,
  batch_size: int | None = None,
  half_precision: bool | None = None,
  steps_per_dispatch: int | None = None,
):
  """A copy of `config` as its `variant` ('plain' or 'gated') with a benchmark's overrides
  (None keeps the config's value; `batch_size` sets the evaluation batch too)."""
  config = config.copy_and_resolve_references()
  config.model.gated = variant == 'gated'
  if batch_size:
    config.batch_size = config.eval_batch_size = batch_size
  if half_precision is not None:
    config.half_precision = half_precision
  if steps_per_dispatch is not None:
    config.steps_per_dispatch = steps_per_dispatch
  return config


class Training(NamedTuple):
  """A config's real training dispatch on resident synthetic data, with its initial state."""

  setup: steps.Setup
  state: Any
  dispatch: dispatch.TrainDispatch
  images: np.ndarray
  labels: np.ndarray


def resident_training(config) -> Training:
  """Builds the model and state and the training dispatch over 4 batches of synthetic images."""
  dataset, images, labels = resident_dataset(config, 4 * config.batch_size)
  setup = steps.build(config, dataset.info)
  key = jax.random.key(0)
  trainer = dispatch.TrainDispatch(setup, dataset, start_step=0, seed=0, data_key=key, key=key)
  return Training(setup, steps.create_state(setup, 0), trainer, images, labels)
