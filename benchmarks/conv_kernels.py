"""Per-layer convolution times on the CPU: XLA's own against the native kernels; one JSON line.

  python benchmarks/conv_kernels.py [--batch_size 128] [--calls 9] [--rounds 3] [--pytorch]

For each 3x3 convolution shape of the CIFAR ResNet-20 (stride 1 at 32x32x16, 16x16x32 and
8x8x64; the two stride-2 ones) it times, as separate jitted programs on random float32 inputs,
the forward pass, the input gradient (dx) and the weight gradient (dw): XLA's own
(`lax.conv_general_dilated` and its autodiff) and the native kernels'
(`cpu/native_conv.conv_general_dilated`, the path the CPU train and eval steps take; a strided
dx is XLA's in both). Each time is the median of `--calls` calls after a warm-up call, and the
rounds are interleaved (every measurement once per round; the median round is reported).

`--pytorch` adds `torch.nn.functional.conv2d` and `torch.ops.aten.convolution_backward` (dx and dw
separately) in NCHW and channels_last, timed the same way in a child process (torch's threads and
XLA's slow each other down in one process). It needs torch (the `benchmark` extra).
"""

from __future__ import annotations

import sys

from gaternet_jax import environment

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import lax  # noqa: E402

from gaternet_jax.cpu import (
  native,  # noqa: E402
  native_conv,
)
from gaternet_jax.models import layers  # noqa: E402

flags.DEFINE_integer('batch_size', 128, 'Images per call.')
flags.DEFINE_integer('calls', 9, 'Timed calls per measurement (their median is kept).')
flags.DEFINE_integer('rounds', 3, 'Interleaved repetitions; the median round is reported.')
flags.DEFINE_bool('pytorch', False, 'Also time PyTorch eager (needs torch).')
FLAGS = flags.FLAGS

# (input size, input channels, output channels, stride) of ResNet-20's 3x3 convolutions.
SHAPES = ((32, 16, 16, 1), (16, 32, 32, 1), (8, 64, 64, 1), (32, 16, 32, 2), (16, 32, 64, 2))
DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

TORCH_SCRIPT = """
import json, statistics, sys, time, torch
batch, calls, shapes = json.loads(sys.argv[1])
torch.set_grad_enabled(False)
def median_ms(f):
  f()
  times = []
  for _ in range(calls):
    start = time.perf_counter(); f(); times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)
out = {}
for size, ci, co, stride in shapes:
  for name, fmt in (('nchw', torch.contiguous_format), ('channels_last', torch.channels_last)):
    x = torch.randn(batch, ci, size, size).contiguous(memory_format=fmt)
    w = (torch.randn(co, ci, 3, 3) * 0.1).contiguous(memory_format=fmt)
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
    dy = torch.randn(y.shape).contiguous(memory_format=fmt)
    def backward(mask):
      return lambda: torch.ops.aten.convolution_backward(
          dy, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask)
    out[f'{size}x{size}x{ci}->{co}/s{stride}/{name}'] = {
      'forward': median_ms(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=1)),
      'dx': median_ms(backward([True, False, False])),
      'dw': median_ms(backward([False, True, False])),
    }
print(json.dumps(out))
"""


def _median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _programs(conv_fn, stride):
  """(forward, dx, dw) jitted programs of one convolution implementation."""

  def conv(x, w):
    return conv_fn(x, w, (stride, stride), 'SAME', dimension_numbers=DIMENSIONS)

  forward = jax.jit(conv)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return forward, dx, dw


def main(argv):
  del argv
  implementations = {'xla': lax.conv_general_dilated}
  if native.available():
    implementations['native'] = native_conv.conv_general_dilated
  rounds: dict[str, list[float]] = {}
  cases = []
  for size, ci, co, stride in SHAPES:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (FLAGS.batch_size, size, size, ci))
    w = jax.random.normal(keys[1], (3, 3, ci, co)) / (3 * ci**0.5)
    out = layers.ceil_div(size, stride)
    dy = jax.random.normal(keys[2], (FLAGS.batch_size, out, out, co))
    for name, conv_fn in implementations.items():
      for part, program in zip(('forward', 'dx', 'dw'), _programs(conv_fn, stride)):
        args = (x, w) if part == 'forward' else (x, w, dy)
        cases.append((f'{size}x{size}x{ci}->{co}/s{stride}/{name}/{part}', program, args))
  for _ in range(FLAGS.rounds):
    for key, program, args in cases:
      rounds.setdefault(key, []).append(_median_ms(program, *args))
  result = {
    'device_kind': jax.devices()[0].device_kind,
    'batch_size': FLAGS.batch_size,
    'native_kernels': native.library_path() is not None or native.unavailable_reason(),
    'ms': {},
  }
  for key, values in rounds.items():
    layer, part = key.rsplit('/', 1)
    result['ms'].setdefault(layer, {})[part] = round(statistics.median(values), 3)
  if FLAGS.pytorch:
    torch_rounds = []
    for _ in range(FLAGS.rounds):
      child = subprocess.run(
        [
          sys.executable,
          '-c',
          TORCH_SCRIPT,
          json.dumps([FLAGS.batch_size, FLAGS.calls, SHAPES]),
        ],
        capture_output=True,
        text=True,
        check=True,
      )
      torch_rounds.append(json.loads(child.stdout.strip().splitlines()[-1]))
    for layer in torch_rounds[0]:
      result['ms'][layer] = {
        part: round(statistics.median(r[layer][part] for r in torch_rounds), 3)
        for part in ('forward', 'dx', 'dw')
      }
  print(json.dumps(result))


if __name__ == '__main__':
  sys.exit(app.run(main))
