"""Process set-up that must happen before JAX starts: XLA flags, log levels, compilation cache.

`gaternet`, the benchmarks and the tests call `prepare()` first thing, so they all run with the
same settings.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading

# Keeps `jax.lax.optimization_barrier`s alive through fusion; without it XLA:CPU deletes them first.
KEEP_BARRIERS_FLAG = '--xla_disable_hlo_passes=cse_barrier_expander'
# Measured on the 2-core CPU this project is developed on: XLA:CPU's default YNNPACK fusion keeps
# ~1.4 of 2 cores busy; disabling it roughly doubled training throughput (see DESIGN.md). Keeping
# the barriers lets the train step store its convolutions' inputs instead of recomputing them
# (models/materialize.py; ResNet-20 training +32%) and take batch norm's sums in two fused stages
# (models/staged_batch_norm.py; +16%). Applied only on CPU-only installs (an experimental flag
# another XLA build may not know), only when the user has not set XLA flags of their own, and
# before JAX starts.
CPU_XLA_FLAGS = f'--xla_cpu_experimental_ynn_fusion_type= {KEEP_BARRIERS_FLAG}'
# GATERNET_CPU_FLAGS=0 (or false/no/off) turns the CPU flags off (e.g. to measure without them).
DISABLE_VARIABLE = 'GATERNET_CPU_FLAGS'
_ACCELERATOR_PLUGINS = (
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
  'libtpu',
  'jax_plugins',
)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'gaternet_jax', 'xla')


# The spellings a GATERNET_* on/off switch accepts (case-insensitive).
_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')
SWITCHES = ('GATERNET_CPU_FLAGS', 'GATERNET_KEEP_FREED_MEMORY', 'GATERNET_NATIVE_KERNELS')


def switch(name: str, environ=os.environ) -> bool | None:
  """An on/off environment variable: True, False, or None when unset (the default applies).

  Raises:
    UserError: any other value, the empty one included (it used to mean the default silently).
  """
  if name not in environ:
    return None
  value = environ[name].strip().lower()
  if value in _TRUE:
    return True
  if value in _FALSE:
    return False
  from gaternet_jax.errors import UserError  # noqa: PLC0415 - pure Python, no JAX

  raise UserError(
    f'{name}={environ[name]!r} is not an on/off value: use one of {"/".join(_TRUE)} or '
    f'{"/".join(_FALSE)}, or unset it for the default'
  )


def check_switches(environ=os.environ) -> None:
  """Raises UserError for the first GATERNET_* switch with a value `switch` does not accept."""
  for name in SWITCHES:
    switch(name, environ)


def cpu_only_install() -> bool:
  """True when no accelerator plugin for JAX is installed (then JAX runs on the CPU)."""
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


# XLA:CPU's LLVM code generation prefers 256-bit vectors by default. On the development CPU
# (AVX-512) 512-bit ones made the training step's elementwise and reduction fusions faster (the
# native convolutions are not XLA's code; the optimised HLO is the same): ResNet-20 training +4-5%
# plain and +1-2% gated (within the noise), but inference ~3% slower (in-process A/Bs, README
# "Throughput"). So only the training step's program gets them, as a per-program compile option
# rather than a process flag. A CPU without 512-bit registers cannot use the preference and gets
# the code it got before.
CPU_TRAIN_COMPILER_OPTIONS = {'xla_cpu_prefer_vector_width': 512}


def train_compiler_options(platform: str, environ=os.environ) -> dict[str, object]:
  """XLA compile options for the training step on `platform` ('cpu', 'gpu', 'tpu').

  CPU only; none with GATERNET_CPU_FLAGS=0, and none that the user's own XLA_FLAGS already set.
  """
  if platform != 'cpu' or switch(DISABLE_VARIABLE, environ) is False:
    return {}
  user_flags = environ.get('XLA_FLAGS', '')
  return {k: v for k, v in CPU_TRAIN_COMPILER_OPTIONS.items() if f'--{k}=' not in user_flags}


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
  """Sets the CPU XLA flags (unless the user set XLA_FLAGS) and quiets TensorFlow's C++ logs.

  Must run before JAX initialises its backend; it changes nothing a user has set.
  """
  if (
    'XLA_FLAGS' not in environ
    and switch(DISABLE_VARIABLE, environ) is not False
    and cpu_only_install()
  ):
    environ['XLA_FLAGS'] = CPU_XLA_FLAGS
    if switch(MALLOC_VARIABLE, environ) is not False:
      keep_freed_memory()
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


# XLA:CPU allocates each execution's temporary buffer (204 MB for ResNet-20's train step at batch
# 128, 403 MB gated) with malloc and frees it after. glibc serves such a size with a fresh mmap,
# from a thread that is not the main one, so every step faulted in and zeroed ~50,000 new pages
# (~99,000 gated): ~90 ms of kernel time per plain step on the 2-core CPU, a quarter of the
# process's CPU time (README, Throughput). One arena (a thread's arena cannot hold more than
# 64 MB), no mmap below 1 GiB and no trimming below 2 GiB keep the freed buffers for the next
# steps instead. Gated ResNet-20 needed the 2 GiB: with 1 GiB the top of the heap was still
# given back and faulted in again every few dozen steps. The cost is memory held: peak resident
# size 0.8 -> 0.9-1.1 GB plain, 1.1 -> 2.2 GB gated.
MALLOC_VARIABLE = 'GATERNET_KEEP_FREED_MEMORY'
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_ABOVE_BYTES = 1 << 30
_TRIM_ABOVE_BYTES = (1 << 31) - 1  # the largest value mallopt takes (an int)


_freed_memory_kept = False  # whether keep_freed_memory() took effect in this process


def keep_freed_memory() -> bool:
  """glibc's malloc keeps freed memory (up to 2 GiB at the heap's top) for reuse.

  For the threads created afterwards (call it before JAX starts). False where the C library is
  not glibc (nothing changes there).
  """
  import ctypes  # noqa: PLC0415

  global _freed_memory_kept
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  if not hasattr(libc, 'gnu_get_libc_version'):
    return False
  _freed_memory_kept = all(
    mallopt(option, value) == 1
    for option, value in (
      (_M_ARENA_MAX, 1),
      (_M_MMAP_THRESHOLD, _MMAP_ABOVE_BYTES),
      (_M_TRIM_THRESHOLD, _TRIM_ABOVE_BYTES),
    )
  )
  return _freed_memory_kept


def freed_memory_kept() -> bool:
  """Whether this process's malloc keeps freed memory (`keep_freed_memory()` took effect)."""
  return _freed_memory_kept


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
