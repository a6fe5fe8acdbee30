"""Where a training step's time goes on the device: kernels per step and their time; one JSON line.

  python benchmarks/step_profile.py --config experiments/cifar10_resnet20.py [--batch_size 128]
      [--variants plain,gated] [--precisions float32,bfloat16] [--steps_per_dispatch K]

For each variant and precision: the real training dispatch (`training/dispatch.TrainDispatch`,
synthetic resident data as in `throughput.py`) is warmed up, timed over `--chunks` dispatches
(`wall_ms_per_step`), then one dispatch is traced with `jax.profiler` and the trace read back with
`jax.profiler.ProfileData`. Device planes (`/device:GPU:0`, TPU) give every kernel the device ran:
`kernels_per_step`, `kernel_ms_per_step` (the sum of their durations) and
`busy_fraction = kernel_ms / wall_ms` (well under 1: the device waits on launches, i.e. the loop
is launch-bound). Kernels are grouped by what their names say (convolution / matmul, convert,
transpose / copy, reduction, other fusions) and the heaviest are listed. On the CPU there is no
device plane; only the wall time is reported.
"""

from __future__ import annotations

import sys

from gaternet_jax import environment

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import collections  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import synthetic  # noqa: E402 - benchmarks/synthetic.py
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', 'experiments/cifar10_resnet20.py', 'Experiment config.')
flags.DEFINE_integer('batch_size', None, "Global batch (default: the config's).")
flags.DEFINE_list('variants', ['plain', 'gated'], 'Variants to profile.')
flags.DEFINE_list(
  'precisions', ['float32', 'bfloat16'], 'float32 and/or bfloat16 (half_precision).'
)
flags.DEFINE_integer('steps_per_dispatch', None, "Training steps per call (default: platform's).")
flags.DEFINE_integer('chunks', 5, 'Timed dispatches before the traced one.')
flags.DEFINE_integer('top', 12, 'Heaviest kernels listed per measurement.')
FLAGS = flags.FLAGS

# Kernel name fragments -> group (first match wins; names are XLA fusion names or library kernels).
# 'convert' comes first: 'conv' is part of it.
GROUPS = (
  ('convert', ('convert',)),
  ('conv_or_matmul', ('conv', 'cudnn', 'xmma', 'gemm', 'cutlass', 'sm90', 'sm80', 'dot', 'wgmma')),
  ('transpose_or_copy', ('transpose', 'copy', 'memcpy', 'bitcast')),
  ('reduction', ('reduce', 'reduction')),
  ('other_fusion', ('fusion',)),
)


def kernel_group(name: str) -> str:
  lower = name.lower()
  for group, fragments in GROUPS:
    if any(f in lower for f in fragments):
      return group
  return 'other'


def device_kernels(trace_dir: str) -> list[tuple[str, float]]:
  """(name, duration ms) of every kernel on a device plane of the trace (empty on the CPU)."""
  from jax.profiler import ProfileData  # noqa: PLC0415

  kernels = []
  for path in glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True):
    for plane in ProfileData.from_file(path).planes:
      if not plane.name.startswith('/device:'):
        continue
      for line in plane.lines:
        # Stream lines hold the kernels; 'XLA Ops'/'XLA Modules' lines repeat them by HLO op.
        if not line.name.lower().startswith('stream'):
          continue
        kernels.extend((e.name, e.duration_ns / 1e6) for e in line.events)
  return kernels


def profile(config, variant: str, precision: str) -> dict:
  config = synthetic.variant_config(
    config,
    variant,
    batch_size=FLAGS.batch_size,
    half_precision=precision == 'bfloat16',
    steps_per_dispatch=FLAGS.steps_per_dispatch,
  )
  _, state, dispatch, _, _ = synthetic.resident_training(config)
  k = dispatch.max_steps
  state, metrics = dispatch(state, 0, k)  # compiles
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(FLAGS.chunks):
    state, metrics = dispatch(state, (i + 1) * k, k)
  jax.block_until_ready(metrics)
  wall_ms = (time.perf_counter() - start) * 1e3 / (FLAGS.chunks * k)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      state, metrics = dispatch(state, (FLAGS.chunks + 1) * k, k)
      jax.block_until_ready(metrics)
    kernels = device_kernels(trace_dir)
  row = {'wall_ms_per_step': round(wall_ms, 4), 'steps_per_dispatch': k}
  if not kernels:
    return row
  by_group = collections.defaultdict(lambda: [0, 0.0])
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for name, ms in kernels:
    for table, key_ in ((by_group, kernel_group(name)), (by_name, name)):
      table[key_][0] += 1
      table[key_][1] += ms
  kernel_ms = sum(ms for _, ms in kernels) / k
  heaviest = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: FLAGS.top]
  row.update(
    kernels_per_step=round(len(kernels) / k, 1),
    kernel_ms_per_step=round(kernel_ms, 4),
    busy_fraction=round(kernel_ms / wall_ms, 3),
    mean_kernel_us=round(1e3 * kernel_ms * k / len(kernels), 2),
    groups={
      g: {'kernels_per_step': round(n / k, 1), 'ms_per_step': round(ms / k, 4)}
      for g, (n, ms) in sorted(by_group.items())
    },
    heaviest={name[:90]: round(ms / k, 4) for name, (_, ms) in heaviest},
  )
  return row


def main(argv):
  del argv
  result = {
    'config': FLAGS.config.name,
    'device_kind': jax.devices()[0].device_kind,
    'backend': jax.default_backend(),
    'batch_size': FLAGS.batch_size or FLAGS.config.batch_size,
  }
  for precision in FLAGS.precisions:
    if precision not in ('float32', 'bfloat16'):
      raise app.UsageError(f'--precisions takes float32 and bfloat16, got {precision!r}')
  for variant in FLAGS.variants:
    for precision in FLAGS.precisions:
      result[f'{variant}/{precision}'] = profile(FLAGS.config, variant, precision)
  print(json.dumps(result))


if __name__ == '__main__':
  sys.exit(app.run(main))
