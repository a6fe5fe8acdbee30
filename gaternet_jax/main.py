"""The `gaternet` command: train, evaluate, describe, analyze, report, sweep.

  gaternet train    --config experiments/cifar10_resnet20.py[:variant] --workdir DIR [--config.x=v]
  gaternet evaluate --workdir DIR [--split S]
  gaternet describe --config experiments/imagenet_resnet152.py[:variant] [--json]
  gaternet analyze  --workdir DIR [--split S] [--max-examples N] [--out DIR]
  gaternet report   DIR [DIR ...] [--out table.md]
  gaternet sweep    --config FILE --sweep field=v1,v2 [--sweep ...] --workdir DIR

Errors caused by the user's input print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import importlib.util
import os
import sys

COMMANDS = ('train', 'evaluate', 'describe', 'analyze', 'report', 'sweep')

# Measured on the 2-core CPU this project is developed on: XLA:CPU's default YNNPACK fusion keeps
# ~1.4 of 2 cores busy; disabling it roughly doubled training throughput (see DESIGN.md). Applied
# only on CPU-only installs (an experimental flag another XLA build may not know), only when the
# user has not set XLA flags of their own, and before JAX starts.
_CPU_XLA_FLAG = '--xla_cpu_experimental_ynn_fusion_type='
_ACCELERATOR_PLUGINS = (
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
  'libtpu',
  'jax_plugins',
)


def cpu_only_install() -> bool:
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def _prepare_environment() -> None:
  if (
    'XLA_FLAGS' not in os.environ
    and os.environ.get('GATERNET_CPU_FLAGS', '1') != '0'
    and cpu_only_install()
  ):
    os.environ['XLA_FLAGS'] = _CPU_XLA_FLAG
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _fail(message: str) -> None:
  print(f'gaternet: error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    if len(argv) >= 2 and argv[1] in ('-h', '--help', 'help'):
      print(__doc__)
      return
    _fail(
      f'usage: gaternet {{{",".join(COMMANDS)}}} [flags]; '
      f'got {argv[1] if len(argv) > 1 else "no command"!r}'
    )
  _prepare_environment()
  from gaternet_jax import cli  # noqa: PLC0415 - JAX must start after the environment is set

  cli.run(argv[1], [f'gaternet {argv[1]}'] + argv[2:], _fail)


if __name__ == '__main__':
  main()
