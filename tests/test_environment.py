"""Process set-up: the CPU XLA flags, and freed memory kept for reuse (no page faults per step)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from gaternet_jax import cpu, environment
from gaternet_jax.cpu import flags as cpu_flags

# Allocates, touches and frees 300 MB three times on a new thread (as XLA:CPU's worker threads
# allocate each execution's temporary buffer) and prints the page faults of each round.
FAULTS = """
import ctypes, json, os, threading
from gaternet_jax import environment
environment.prepare()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 300 << 20
faults = []
def minor_faults():
  return int(open(f'/proc/{os.getpid()}/stat').read().split()[9])
def rounds():
  for _ in range(3):
    before = minor_faults()
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(minor_faults() - before)
t = threading.Thread(target=rounds)
t.start(); t.join()
print(json.dumps({'faults': faults, 'xla_flags': os.environ.get('XLA_FLAGS')}))
"""


def _faults(env: dict) -> dict:
  clean = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', cpu_flags.MALLOC_VARIABLE)}
  result = subprocess.run(
    [sys.executable, '-c', FAULTS],
    cwd=REPO,
    env=dict(clean, **env),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


needs_glibc_linux = pytest.mark.skipif(
  not sys.platform.startswith('linux') or not os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc'),
  reason='page-fault counts and mallopt are Linux/glibc facts',
)


@needs_glibc_linux
def test_freed_buffers_are_reused_without_new_page_faults():
  pages = (300 << 20) // os.sysconf('SC_PAGE_SIZE')
  kept = _faults({})
  assert kept['xla_flags'] == cpu_flags.CPU_XLA_FLAGS
  assert kept['faults'][0] >= pages * 0.9  # the first round maps its memory
  assert max(kept['faults'][1:]) < pages * 0.01  # later rounds reuse it
  unmapped = _faults({cpu_flags.MALLOC_VARIABLE: '0'})
  assert min(unmapped['faults']) >= pages * 0.9  # glibc's default: a fresh mmap every round


@needs_glibc_linux
def test_a_users_own_xla_flags_leave_flags_and_malloc_alone():
  mine = _faults({'XLA_FLAGS': '--xla_cpu_enable_fast_math=false'})
  assert mine['xla_flags'] == '--xla_cpu_enable_fast_math=false'
  pages = (300 << 20) // os.sysconf('SC_PAGE_SIZE')
  assert min(mine['faults']) >= pages * 0.9


def test_prepare_sets_flags_only_where_the_user_did_not():
  environ = {}
  environment.prepare(environ)
  assert environ['XLA_FLAGS'] == cpu_flags.CPU_XLA_FLAGS or not environment.cpu_only_install()
  environ = {'XLA_FLAGS': '--mine'}
  environment.prepare(environ)
  assert environ['XLA_FLAGS'] == '--mine'
  environ = {cpu_flags.DISABLE_VARIABLE: '0'}
  environment.prepare(environ)
  assert 'XLA_FLAGS' not in environ


def test_compiler_options_are_for_the_cpu_and_never_over_the_users_flags():
  wide = {'xla_cpu_prefer_vector_width': 512}
  assert cpu_flags.program_options('train', {}) == wide
  assert cpu_flags.program_options('train', {'XLA_FLAGS': '--xla_cpu_ftz=true'}) == wide
  assert cpu_flags.program_options('init', {}) == {'xla_backend_optimization_level': 0}
  assert cpu.compiler_options('gpu', 'train') == {} and cpu.compiler_options('tpu', 'init') == {}
  assert cpu_flags.program_options('train', {cpu_flags.DISABLE_VARIABLE: '0'}) == {}
  mine = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2 --xla_cpu_prefer_vector_width=256'}
  assert cpu_flags.program_options('train', mine) == {}


CPU_ONLY_MODULES = ('native', 'native_conv', 'staged_batch_norm', 'materialize')


def test_the_cpu_speed_code_is_reached_only_through_its_seam():
  """Outside gaternet_jax/cpu/, nothing imports the kernels, staged batch norm or the barriers."""
  package = os.path.join(REPO, 'gaternet_jax')
  offenders = []
  for folder, _, files in os.walk(package):
    if os.path.relpath(folder, package).split(os.sep)[0] == 'cpu':
      continue
    for name in files:
      if name.endswith('.py'):
        with open(os.path.join(folder, name)) as f:
          text = f.read()
        offenders += [
          f'{name}: {m}'
          for m in CPU_ONLY_MODULES
          if f'cpu.{m}' in text or f'cpu import {m}' in text
        ]
  assert offenders == []


@pytest.mark.slow
def test_other_platforms_never_load_the_cpu_speed_code():
  code = (
    'import json, sys; from gaternet_jax import cpu; from gaternet_jax.training import steps\n'
    "loaded = lambda: sorted(m for m in sys.modules if m.startswith('gaternet_jax.cpu.'))\n"
    "cpu.speedups('tpu', training=True); cpu.speedups('gpu', training=False)\n"
    "assert cpu.compiler_options('gpu', 'train') == {}\n"
    "elsewhere = loaded(); cpu.speedups('cpu', training=True)\n"
    'print(json.dumps([elsewhere, loaded()]))'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
  )
  elsewhere, on_cpu = json.loads(out.stdout.strip().splitlines()[-1])
  assert not {m.rsplit('.', 1)[-1] for m in elsewhere} & set(CPU_ONLY_MODULES)
  assert set(CPU_ONLY_MODULES) <= {m.split('.')[2] for m in on_cpu}  # the control: CPU loads them
