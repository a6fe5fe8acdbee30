"""Training and inference throughput of a config's plain and gated variants; one JSON line.

  python benchmarks/throughput.py --config experiments/cifar10_resnet20.py [--batch_size 128]

Synthetic uint8 batches of the dataset's shape (no data is read); the training step is the real
one (augmentation, SemHash, the L1 term, SGD), jitted over all devices. Reports images/s after
warm-up, compile seconds, and the device kind.
"""

from __future__ import annotations

import sys

from gaternet_jax import environment

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from gaternet_jax import describe, steps  # noqa: E402
from gaternet_jax.data import feed  # noqa: E402
from gaternet_jax.data.base import DatasetInfo  # noqa: E402

config_flags.DEFINE_config_file('config', 'experiments/cifar10_resnet20.py', 'Experiment config.')
flags.DEFINE_integer('batch_size', None, "Global batch (default: the config's).")
flags.DEFINE_integer('steps', 20, 'Timed steps per measurement.')
flags.DEFINE_list('variants', ['plain', 'gated'], 'Variants to measure.')
flags.DEFINE_bool('half_precision', None, 'Override config.half_precision.')
FLAGS = flags.FLAGS


def measure(config, variant: str) -> dict:
  config = config.copy_and_resolve_references()
  config.variant = variant
  config.model.gated = variant == 'gated'
  if FLAGS.batch_size:
    config.batch_size = config.eval_batch_size = FLAGS.batch_size
  if FLAGS.half_precision is not None:
    config.half_precision = FLAGS.half_precision
  num_classes, shape = describe.dataset_spec(config.data)
  info = DatasetInfo(
    name='synthetic',
    num_classes=num_classes,
    image_shape=tuple(shape),
    mean=(127.0,) * shape[-1],
    std=(64.0,) * shape[-1],
    num_train=10**6,
    split_sizes={},
    in_memory=config.data.name != 'imagenet2012',
  )
  setup = steps.build(config, info)
  state = steps.create_state(setup, 0)
  train_fn, eval_fn, _ = steps.compile_steps(setup)
  rng = np.random.default_rng(0)
  b = config.batch_size
  batch = {
    'image': rng.integers(0, 255, (b, *shape), dtype=np.uint8),
    'label': rng.integers(0, num_classes, (b,), dtype=np.int32),
  }
  batch = feed.to_global(batch, setup.data_sharding)
  eval_batch = dict(batch, mask=jax.device_put(jnp.ones((b,), jnp.float32), setup.data_sharding))
  key = jax.random.key(0)

  start = time.perf_counter()
  compiled_train = train_fn.lower(state, batch, key).compile()
  compiled_eval = eval_fn.lower(state, eval_batch).compile()
  compile_s = time.perf_counter() - start

  def timed(fn, *args, donate=False):
    nonlocal state
    for _ in range(3):  # warm-up
      out = fn(*args) if not donate else fn(state, *args)
      if donate:
        state = out[0]
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      out = fn(*args) if not donate else fn(state, *args)
      if donate:
        state = out[0]
    jax.block_until_ready(out)
    return FLAGS.steps * b / (time.perf_counter() - start)

  train_ips = timed(compiled_train, batch, key, donate=True)
  infer_ips = timed(compiled_eval, state, eval_batch)
  return {
    'train_images_per_s': round(train_ips, 1),
    'inference_images_per_s': round(infer_ips, 1),
    'compile_s': round(compile_s, 2),
    'batch_size': b,
    'half_precision': bool(config.half_precision),
  }


def main(argv):
  del argv
  config = FLAGS.config
  result = {
    'config': config.name,
    'device_kind': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    'backend': jax.default_backend(),
  }
  for variant in FLAGS.variants:
    result[variant] = measure(config, variant)
  print(json.dumps(result))


if __name__ == '__main__':
  sys.exit(app.run(main))
