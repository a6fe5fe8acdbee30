"""Cold compile seconds of the training dispatch of each config; one JSON line.

  python benchmarks/compile_time.py [--configs experiments/cifar10_resnet20.py:gated,...]

For every config (default: the Table-1 gated CIFAR-10 ResNets) it builds the model and times
the initialisation (`init_s`: compiling and running the jitted init of parameters and optimizer
state), then jax.jit's `lower` (`trace_s`) and `compile` (`compile_s`) of the real training dispatch
(`dispatch.TrainDispatch`, resident synthetic data, the platform's steps per dispatch) with
the persistent compilation cache off, so every number is a cold compile. Each config runs in a
fresh process (`--one` is the worker), so the in-memory caches of one cannot help the next.
"""

from __future__ import annotations

import sys

from gaternet_jax import cpu, environment

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import synthetic  # noqa: E402 - benchmarks/synthetic.py
from absl import app, flags  # noqa: E402

from gaternet_jax.training import dispatch, steps  # noqa: E402

TABLE1_GATED = [
  f'experiments/cifar10_resnet{depth}.py:{variant}'
  for depth in (20, 56, 164)
  for variant in ('gated',)
]
flags.DEFINE_list('configs', TABLE1_GATED, 'config files with their variant argument.')
flags.DEFINE_string('one', None, 'Measure this one config in this process (internal).')
FLAGS = flags.FLAGS


def measure_one(spec: str) -> dict:
  jax.config.update('jax_enable_compilation_cache', False)
  config = synthetic.load_config(spec)
  dataset, _, _ = synthetic.resident_dataset(config, 2 * config.batch_size)
  setup = steps.build(config, dataset.info)
  start = time.perf_counter()
  state = jax.block_until_ready(steps.create_state(setup, 0))  # compiles and runs the init
  init_s = time.perf_counter() - start
  key = jax.random.key(0)
  trainer = dispatch.TrainDispatch(setup, dataset, start_step=0, seed=0, data_key=key, key=key)
  start = time.perf_counter()
  lowered = trainer.lower(state)
  traced = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {
    'trace_s': round(traced - start, 2),
    'compile_s': round(done - traced, 2),
    'total_s': round(done - start, 2),
    'init_s': round(init_s, 2),
    'steps_per_dispatch': trainer.max_steps,
    'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
  }


def main(argv):
  del argv
  if FLAGS.one:
    print(json.dumps(measure_one(FLAGS.one)))
    return
  result = {
    'device_kind': jax.devices()[0].device_kind,
    'xla_flags': os.environ.get('XLA_FLAGS'),
    'train_compiler_options': cpu.compiler_options(jax.default_backend(), 'train'),
  }
  for spec in FLAGS.configs:
    out = subprocess.run(
      [sys.executable, __file__, f'--one={spec}'], capture_output=True, text=True, check=False
    )
    if out.returncode:
      raise RuntimeError(f'{spec}: {out.stderr[-2000:]}')
    result[spec] = json.loads(out.stdout.strip().splitlines()[-1])
  print(json.dumps(result))


if __name__ == '__main__':
  sys.exit(app.run(main))
