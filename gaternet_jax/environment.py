"""Process set-up that must happen before JAX starts: platform, log levels, compilation cache.

`gaternet`, the benchmarks and the tests call `prepare()` first thing, so they all run with the
same settings.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading

from gaternet_jax.cpu import flags as cpu_flags
from gaternet_jax.cpu.flags import check_switches  # noqa: F401 - main checks them first

_ACCELERATOR_PLUGINS = (
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
  'libtpu',
  'jax_plugins',
)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'gaternet_jax', 'xla')


def cpu_only_install() -> bool:
  """True when no accelerator plugin for JAX is installed (then JAX runs on the CPU)."""
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def prepare_tpu_compile(environ=os.environ) -> None:
  """Before JAX starts, for `gaternet compile` on a machine without a TPU: JAX stays on the CPU,
  and libtpu, asked only for a topology, does not look for a TPU VM's metadata (without these it
  printed a page of warnings about undeterminable TPU types and worker hostnames). Nothing the
  user has set is changed."""
  environ.setdefault('JAX_PLATFORMS', 'cpu')
  environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  environ.setdefault('TPU_ACCELERATOR_TYPE', 'v4-8')
  environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')


def prepare(environ=os.environ) -> None:
  """Sets the CPU-only process flags (`cpu.flags`: XLA flags, malloc) and quiets TensorFlow's C++
  logs.

  Must run before JAX initialises its backend; it changes nothing a user has set.
  """
  if cpu_only_install():
    cpu_flags.set_process_flags(environ)
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache, in ~/.cache unless JAX_COMPILATION_CACHE_DIR is set."""
  import jax  # noqa: PLC0415 - callers run `prepare()` before JAX starts

  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', DEFAULT_CACHE_DIR)


def quiet_libraries() -> None:
  """Keeps the command's output to what a user acts on: one line per error.

  JAX logs at INFO that it found no TPU; Orbax logs several lines per checkpoint and, when a
  write fails (a full disk), a traceback per background thread; asyncio reports event loops
  closed at exit. gaternet reports every failure itself, as one line, so these go to the debug
  log instead of the terminal.
  """
  from absl import logging as absl_logging  # noqa: PLC0415

  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  absl_logging.get_absl_handler().addFilter(
    lambda record: '/orbax/' not in record.pathname or record.levelno >= logging.CRITICAL
  )

  def quiet_thread_error(args) -> None:
    absl_logging.debug('Background thread %s failed: %r', args.thread, args.exc_value)

  def quiet_unraisable(args) -> None:
    absl_logging.debug('Ignored at shutdown: %r', args.exc_value)

  threading.excepthook = quiet_thread_error
  sys.unraisablehook = quiet_unraisable
