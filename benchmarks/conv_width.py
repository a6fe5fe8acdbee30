"""Does removing a convolution's output filters make it faster here? One JSON line.

  python benchmarks/conv_width.py [--batch_size 256] [--rounds 5] [--calls 5]

An export (`gaternet export`) removes a gated convolution's always-off output filters. That only
buys time if the device's convolution gets cheaper with fewer output channels. This times the
forward 3x3 'SAME' convolutions of CIFAR ResNet-20's three stages (32x32x16, 16x16x32, 8x8x64
inputs) with several output widths, on the current device with the `gaternet` command's XLA
flags: milliseconds per call, the median over `--rounds` interleaved rounds of `--calls` calls.
"""

from __future__ import annotations

import os

from gaternet_jax import environment

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import lax  # noqa: E402

flags.DEFINE_integer('batch_size', 256, 'Images per call.')
flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; the median is reported.')
flags.DEFINE_integer('calls', 5, 'Calls timed per round.')
FLAGS = flags.FLAGS

# (spatial size, input channels, output widths): ResNet-20's stages, full width last.
STAGES = ((32, 16, (4, 8, 12, 16)), (16, 32, (8, 16, 24, 32)), (8, 64, (16, 32, 48, 64)))


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  conv = jax.jit(_conv)
  cases = {}
  for size, cin, widths in STAGES:
    x = jax.device_put(rng.normal(size=(FLAGS.batch_size, size, size, cin)).astype(np.float32))
    for cout in widths:
      w = jax.device_put(rng.normal(size=(3, 3, cin, cout)).astype(np.float32))
      jax.block_until_ready(conv(x, w))  # compile and warm up
      cases[f'{size}x{size}x{cin}->{cout}'] = (x, w)
  times: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(FLAGS.rounds):
    for name, (x, w) in cases.items():
      start = time.perf_counter()
      for _ in range(FLAGS.calls):
        out = conv(x, w)
      jax.block_until_ready(out)
      times[name].append(1e3 * (time.perf_counter() - start) / FLAGS.calls)
  print(
    json.dumps(
      {
        'device_kind': jax.devices()[0].device_kind,
        'batch_size': FLAGS.batch_size,
        'ms_per_call': {name: round(statistics.median(v), 2) for name, v in times.items()},
        'rounds': FLAGS.rounds,
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
      }
    )
  )


if __name__ == '__main__':
  app.run(main)
