"""How strongly the batch-shaping term pulls at initialisation, against the cross-entropy; one JSON
line.

  python benchmarks/bas_gradients.py [--config experiments/cifar10_resnet20_bas.py:bas]
      [--data_dir DIR] [--batch_size 128] [--batches 4]

For a freshly initialised locally gated model (its gating modules' parameters), the norm of the
gradient of each term of the loss at step 0 (batch-shaping at its initial weight gamma), with
the term reduced over the gates both ways (`gating.batch_shaping_reduction`: 'sum', the recipe's
meaning of gamma, and 'mean', the authors' loss function's), and the ratio of each to the
cross-entropy's, averaged over `--batches` training batches (training mode, no augmentation).
Images: the image folder `--data_dir` (e.g. the CIFAR-10 JPEGs; its first training images), else
random uint8 images of the dataset's shape.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaternet_jax import environment  # noqa: E402

environment.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gaternet_jax import models
from gaternet_jax.data import base as data_base  # noqa: E402
from gaternet_jax.gating.local import MODULE_NAME  # noqa: E402
from gaternet_jax.training import losses, steps  # noqa: E402

config_flags.DEFINE_config_file(
  'config', 'experiments/cifar10_resnet20_bas.py:bas', 'A BaS config.'
)
flags.DEFINE_string('data_dir', None, 'An image folder (root/train/<class>/...); else random.')
flags.DEFINE_integer('batch_size', 128, 'Examples per batch.')
flags.DEFINE_integer('batches', 4, 'Batches averaged over.')
FLAGS = flags.FLAGS


def _images(config, count: int):
  """(images, labels, info): the folder's first training images, or random ones."""
  if FLAGS.data_dir:
    from gaternet_jax import data  # noqa: PLC0415

    c = config.data.copy_and_resolve_references()
    c.name, c.data_dir, c.holdout, c.eval_split = 'imagefolder', FLAGS.data_dir, 0, 'train'
    dataset = data.load_dataset(c)
    images, labels = dataset.train_arrays()
    return images[:count], labels[:count], dataset.info
  from gaternet_jax.commands import describe  # noqa: PLC0415

  num_classes, shape = describe.dataset_spec(config.data)
  rng = np.random.default_rng(0)
  info = data_base.DatasetInfo(
    name='random', num_classes=num_classes, image_shape=tuple(shape), mean=(127.0,) * shape[-1],
    std=(64.0,) * shape[-1], num_train=max(count, config.batch_size), split_sizes={},
    in_memory=True,
  )  # fmt: skip
  images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
  return images, rng.integers(0, num_classes, count).astype(np.int32), info


def _gating_norm(grads) -> float:
  leaves = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
    if any(getattr(k, 'key', None) == MODULE_NAME for k in path)
  ]
  return float(optax.global_norm(leaves))


def main(argv):
  del argv
  config = FLAGS.config
  if not models.is_local(config) or 'batch_shaping' not in config.gating.losses:
    raise app.UsageError('needs a locally gated config with the batch-shaping loss (a _bas config)')
  n = FLAGS.batch_size * FLAGS.batches
  images, labels, info = _images(config, n)
  setup = steps.build(config, info)
  state = steps.create_state(setup, 0)
  norms = {'cross_entropy': [], 'sum': [], 'mean': []}
  for b in range(FLAGS.batches):
    chunk = slice(b * FLAGS.batch_size, (b + 1) * FLAGS.batch_size)
    x = steps.preprocess(config, info, jnp.asarray(images[chunk]), None)
    y = jnp.asarray(labels[chunk])

    def terms(params, reduction, x=x, y=y):
      c = config.copy_and_resolve_references()
      c.gating.batch_shaping_reduction = reduction
      (logits, aux), _ = setup.model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        rngs={'gates': jax.random.key(b)}, mutable=['batch_stats'],
      )  # fmt: skip
      _, t = losses.objective(logits, y, aux, c, losses.Progress(0, 1000))
      return t

    for reduction in ('sum', 'mean'):
      grad = jax.grad(lambda p, r=reduction: terms(p, r)['batch_shaping'])(state.params)
      norms[reduction].append(_gating_norm(grad))
    grad = jax.grad(lambda p: terms(p, 'sum')['cross_entropy'])(state.params)
    norms['cross_entropy'].append(_gating_norm(grad))
  mean = {k: float(np.mean(v)) for k, v in norms.items()}
  gates = sum(layer.filters for layer in models.gate_layout(config, info.image_shape))
  print(
    json.dumps({
      'config': config.name,
      'images': 'folder' if FLAGS.data_dir else 'random',
      'batch_size': FLAGS.batch_size,
      'batches': FLAGS.batches,
      'gates': gates,
      'gamma': float(config.gating.batch_shaping_weight),
      'gating_grad_norm': mean,
      'ratio_to_cross_entropy': {
        r: mean[r] / mean['cross_entropy'] for r in ('sum', 'mean')
      },
    })
  )  # fmt: skip


if __name__ == '__main__':
  app.run(main)
