"""What the benchmark scripts share: a config from `path.py[:arg]`, and resident synthetic data.

Imported by the scripts in this folder (run as `python benchmarks/NAME.py`, so this folder is on
the import path); it is not part of the library.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from gaternet_jax import describe
from gaternet_jax.data.base import DatasetInfo, InMemoryDataset


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
