"""Training and inference throughput of a config's plain and gated variants; one JSON line.

  python benchmarks/throughput.py --config experiments/cifar10_resnet20.py [--batch_size 128]
      [--rounds 3] [--steps 20] [--steps_per_dispatch K] [--pytorch]

Synthetic uint8 images of the dataset's shape, resident on the devices as in a real run (no data
is read). Training is the real loop's path: `training/dispatch.TrainDispatch` (batches drawn on the
device, augmentation, SemHash, the L1 term, SGD), K steps per dispatch (default: the platform's).
Inference is the evaluation step on one batch. Each measurement runs `--steps` steps after a
warm-up; `--rounds` repeats every measurement in turn (interleaved, so that a slow spell of the
machine hits all of them) and the medians are reported, with every round's value. The line also
says whether the native CPU kernels ran (`native_kernels`: true, or why not) and whether freed
memory was kept for reuse (`freed_memory_kept`; cpu_flags.keep_freed_memory).

`--pytorch` also measures `benchmarks/pytorch_reference.py` (the same ResNet-20 in PyTorch eager,
NCHW and channels_last) in the same rounds, and adds the ratios of ours to it. It needs torch
(the `benchmark` extra); only the CIFAR ResNet-20 has a reference. Each PyTorch round runs in a
child process: in one process, torch's OpenMP threads and XLA's thread pool slowed each other
several-fold (measured on the 2-core development CPU).
"""

from __future__ import annotations

import os
import sys

from gaternet_jax import cpu, environment
from gaternet_jax.cpu import flags as cpu_flags

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import synthetic  # noqa: E402 - benchmarks/synthetic.py
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gaternet_jax.cpu import native  # noqa: E402
from gaternet_jax.data import feed  # noqa: E402
from gaternet_jax.training import steps

config_flags.DEFINE_config_file('config', 'experiments/cifar10_resnet20.py', 'Experiment config.')
flags.DEFINE_integer('batch_size', None, "Global batch (default: the config's).")
flags.DEFINE_integer('steps', 20, 'Timed steps per measurement.')
flags.DEFINE_integer('rounds', 3, 'Interleaved repetitions of every measurement; medians reported.')
flags.DEFINE_integer('steps_per_dispatch', None, "Training steps per call (default: platform's).")
flags.DEFINE_list('variants', ['plain', 'gated'], 'Variants to measure.')
flags.DEFINE_bool('half_precision', None, 'Override config.half_precision.')
flags.DEFINE_bool('pytorch', False, 'Also measure the PyTorch eager reference (needs torch).')
FLAGS = flags.FLAGS

WARMUP_STEPS = 3


class Measurement:
  """One variant, built and compiled once; `train()` and `infer()` time it (images/s)."""

  def __init__(self, config, variant: str):
    config = synthetic.variant_config(
      config,
      variant,
      batch_size=FLAGS.batch_size,
      half_precision=FLAGS.half_precision,
      steps_per_dispatch=FLAGS.steps_per_dispatch,
    )
    b = self.batch_size = config.batch_size
    setup, self.state, self.dispatch, images, labels = synthetic.resident_training(config)
    self.setup, self.step = setup, 0
    self.k = self.dispatch.max_steps
    eval_fn = steps.compile_steps(setup)[1]
    batch = {'image': images[:b], 'label': labels[:b], 'mask': np.ones((b,), np.float32)}
    self.eval_batch = feed.to_global(batch, setup.data_sharding)
    start = time.perf_counter()
    self.threshold = jnp.float32(0.0)  # the trained model's gates
    self.eval_fn = eval_fn.lower(self.state, self.eval_batch, self.threshold).compile()
    self.train(timed_steps=self.k)  # compiles the training dispatch
    self.compile_s = time.perf_counter() - start
    self.half_precision = bool(config.half_precision)

  def _chunk(self):
    self.state, metrics = self.dispatch(self.state, self.step, self.k)
    self.step += self.k
    return metrics

  def train(self, timed_steps: int | None = None) -> float:
    chunks = max(1, round((timed_steps or FLAGS.steps) / self.k))
    for _ in range(max(1, round(WARMUP_STEPS / self.k))):
      metrics = self._chunk()
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(chunks):
      metrics = self._chunk()
    jax.block_until_ready(metrics)
    return chunks * self.k * self.batch_size / (time.perf_counter() - start)

  def infer(self) -> float:
    for _ in range(WARMUP_STEPS):
      out = self.eval_fn(self.state, self.eval_batch, self.threshold)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      out = self.eval_fn(self.state, self.eval_batch, self.threshold)
    jax.block_until_ready(out)
    return FLAGS.steps * self.batch_size / (time.perf_counter() - start)


PYTORCH_FORMATS = ('nchw', 'channels_last')


def _pytorch_round(batch_size: int) -> dict:
  """One round of benchmarks/pytorch_reference.py in a child process (see the docstring)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pytorch_reference.py')
  out = subprocess.run(
    [sys.executable, script, f'--batch_size={batch_size}', f'--steps={FLAGS.steps}'],
    capture_output=True,
    text=True,
    check=False,
  )
  if out.returncode:
    raise app.UsageError(f'the PyTorch reference failed (is torch installed?): {out.stderr[-500:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(rounds: list[float]) -> dict:
  return {'median': round(statistics.median(rounds), 1), 'rounds': [round(r, 1) for r in rounds]}


def main(argv):
  del argv
  config = FLAGS.config
  result = {
    'config': config.name,
    'device_kind': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    'backend': jax.default_backend(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'train_compiler_options': cpu.compiler_options(jax.default_backend(), 'train'),
    'freed_memory_kept': cpu_flags.freed_memory_kept(),
  }
  measurements = {v: Measurement(config, v) for v in FLAGS.variants}
  if FLAGS.pytorch and config.model.backbone != 'cifar_resnet20':
    raise app.UsageError('--pytorch has a reference for cifar_resnet20 configs only')
  torch_version = None
  times: dict[str, list[float]] = {}
  for _ in range(FLAGS.rounds):
    for variant, m in measurements.items():
      times.setdefault(f'{variant}/train', []).append(m.train())
      times.setdefault(f'{variant}/inference', []).append(m.infer())
    if FLAGS.pytorch:
      r = _pytorch_round(next(iter(measurements.values())).batch_size)
      torch_version = r['torch_version']
      for fmt in PYTORCH_FORMATS:
        times.setdefault(f'pytorch_{fmt}/train', []).append(r[fmt]['train_images_per_s'])
        times.setdefault(f'pytorch_{fmt}/inference', []).append(r[fmt]['inference_images_per_s'])
  # Asked after the models are built: their first traced step compiled the kernels (or not).
  result['native_kernels'] = native.library_path() is not None or native.unavailable_reason()
  for variant, m in measurements.items():
    result[variant] = {
      'train_images_per_s': _summary(times[f'{variant}/train']),
      'inference_images_per_s': _summary(times[f'{variant}/inference']),
      'compile_s': round(m.compile_s, 2),
      'batch_size': m.batch_size,
      'steps_per_dispatch': m.k,
      'half_precision': m.half_precision,
    }
  median = lambda key: statistics.median(times[key])  # noqa: E731
  ratios = {}
  if 'plain' in measurements and 'gated' in measurements:
    ratios['gated_vs_plain_train'] = median('gated/train') / median('plain/train')
  if FLAGS.pytorch:
    result['pytorch'] = {'torch_version': torch_version}
    for fmt in PYTORCH_FORMATS:
      result['pytorch'][fmt] = {
        f'{kind}_images_per_s': _summary(times[f'pytorch_{fmt}/{kind}'])
        for kind in ('train', 'inference')
      }
      if 'plain' in measurements:
        for kind in ('train', 'inference'):
          ratios[f'plain_vs_pytorch_{fmt}_{kind}'] = median(f'plain/{kind}') / median(
            f'pytorch_{fmt}/{kind}'
          )
  result['ratios'] = {k: round(v, 3) for k, v in ratios.items()}
  print(json.dumps(result))


if __name__ == '__main__':
  sys.exit(app.run(main))
