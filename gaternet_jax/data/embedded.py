"""The embedded offline default dataset: scikit-learn's bundled handwritten digits.

`sklearn.datasets.load_digits()` ships inside scikit-learn (no download): 1,797 grayscale 8x8
digits with values 0..16 and 10 classes. They are rescaled to uint8 0..255 and upsampled to 16x16
(nearest neighbour, so every pixel value stays a real one), one channel. A fixed seeded
permutation puts 297 images in 'test' and 1,500 in 'train', so `gaternet train` works anywhere in
minutes with no data on disk.
"""

from __future__ import annotations

import numpy as np

from gaternet_jax import errors
from gaternet_jax.data import base

NAME = 'default'
NUM_TEST = 297
NUM_CLASSES = 10
IMAGE_SIZE = 16
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
# The train/test split is part of the dataset's definition; never change it.
_SPLIT_SEED = 0


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """All of the dataset: {'train': (images, labels), 'test': (images, labels)}, global."""
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(
      "data.name='default' needs scikit-learn (its bundled digits are the offline dataset): "
      'pip install scikit-learn'
    ) from e
  digits = datasets.load_digits()
  # Values are integers 0..16; 255/16 maps them onto the full uint8 range.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  scale = IMAGE_SIZE // images.shape[1]
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)[..., None]
  labels = digits.target.astype(np.int32)
  permutation = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
  test, train = np.sort(permutation[:NUM_TEST]), np.sort(permutation[NUM_TEST:])
  return {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}


def load(part: base.ProcessSlice) -> base.InMemoryDataset:
  """Builds the in-memory dataset, holding the share of the examples `part` gives this process."""
  splits = load_arrays()
  return base.from_global_arrays(
    NAME,
    part,
    num_classes=NUM_CLASSES,
    train=splits['train'],
    evals={'test': splits['test']},
    class_names=[str(d) for d in range(NUM_CLASSES)],
  )
