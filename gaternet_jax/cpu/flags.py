"""XLA:CPU process flags, malloc settings, per-program compile options and the GATERNET_* switches.

Pure Python (no JAX): `environment.prepare()` applies the process settings before JAX starts, and
`cpu.compiler_options` hands the per-program options to the step builders. Everything here was
measured on the 2-core AVX-512 development CPU (docs/performance.md) and is applied only to
CPU-only installs, only where the user has not set XLA flags of their own.
"""

from __future__ import annotations

import os

# Keeps `jax.lax.optimization_barrier`s alive through fusion; without it XLA:CPU deletes them first.
KEEP_BARRIERS_FLAG = '--xla_disable_hlo_passes=cse_barrier_expander'
# XLA:CPU's default YNNPACK fusion kept ~1.4 of 2 cores busy; disabling it roughly doubled training
# throughput. Keeping the barriers lets the train step store its convolutions' inputs instead of
# recomputing them (cpu/materialize.py; ResNet-20 training +32%) and take batch norm's sums in two
# fused stages (cpu/staged_batch_norm.py; +16%). An experimental flag another XLA build may not
# know: hence CPU-only installs only.
CPU_XLA_FLAGS = f'--xla_cpu_experimental_ynn_fusion_type= {KEEP_BARRIERS_FLAG}'
# GATERNET_CPU_FLAGS=0 (or false/no/off) turns the CPU flags off (e.g. to measure without them).
DISABLE_VARIABLE = 'GATERNET_CPU_FLAGS'
# XLA:CPU allocates each execution's temporary buffer (204 MB for ResNet-20's train step at batch
# 128, 403 MB gated) with malloc and frees it after. glibc serves such a size with a fresh mmap,
# from a thread that is not the main one, so every step faulted in and zeroed ~50,000 new pages
# (~99,000 gated): ~90 ms of kernel time per plain step on the 2-core CPU, a quarter of the
# process's CPU time. One arena (a thread's arena cannot hold more than 64 MB), no mmap below
# 1 GiB and no trimming below 2 GiB keep the freed buffers for the next steps instead. Gated
# ResNet-20 needed the 2 GiB: with 1 GiB the top of the heap was still given back and faulted in
# again every few dozen steps. The cost is memory held: peak resident size 0.8 -> 0.9-1.1 GB
# plain, 1.1 -> 2.2 GB gated.
MALLOC_VARIABLE = 'GATERNET_KEEP_FREED_MEMORY'
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_ABOVE_BYTES = 1 << 30
_TRIM_ABOVE_BYTES = (1 << 31) - 1  # the largest value mallopt takes (an int)
# XLA:CPU's LLVM code generation prefers 256-bit vectors by default. On the development CPU
# (AVX-512) 512-bit ones made the training step's elementwise and reduction fusions faster:
# ResNet-20 training +4-5% plain and +1-2% gated (within the noise), but inference ~3% slower. So
# only the training program gets them, as a compile option rather than a process flag. A CPU
# without 512-bit registers cannot use the preference and gets the code it got before.
# The init program runs once; its random draws cost most of its compile time (ResNet-164-Gated:
# 12.6 s at the default optimisation level, 4.6 s at 0) and the values are the same.
PROGRAM_OPTIONS = {
  'train': {'xla_cpu_prefer_vector_width': 512},
  'init': {'xla_backend_optimization_level': 0},
}

# The spellings a GATERNET_* on/off switch accepts (case-insensitive).
_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')
SWITCHES = (DISABLE_VARIABLE, MALLOC_VARIABLE, 'GATERNET_NATIVE_KERNELS')


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


def set_process_flags(environ=os.environ) -> None:
  """XLA_FLAGS and glibc's malloc settings for a CPU-only process; call before JAX starts.

  Nothing changes when the user set XLA_FLAGS or GATERNET_CPU_FLAGS=0.
  """
  if 'XLA_FLAGS' in environ or switch(DISABLE_VARIABLE, environ) is False:
    return
  environ['XLA_FLAGS'] = CPU_XLA_FLAGS
  if switch(MALLOC_VARIABLE, environ) is not False:
    keep_freed_memory()


def program_options(program: str, environ=os.environ) -> dict[str, object]:
  """XLA:CPU compile options for 'train' or 'init'; none with GATERNET_CPU_FLAGS=0, and none that
  the user's own XLA_FLAGS already set."""
  if switch(DISABLE_VARIABLE, environ) is False:
    return {}
  user_flags = environ.get('XLA_FLAGS', '')
  return {k: v for k, v in PROGRAM_OPTIONS[program].items() if f'--{k}=' not in user_flags}


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
