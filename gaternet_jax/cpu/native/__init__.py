"""Native CPU kernels: C++ sources here, compiled on first use and registered as XLA FFI targets.

XLA:CPU's own convolutions are slow for what CPU training of these models does
(docs/performance.md); the kernels here replace them where `cpu/native_conv.py` finds them applicable.
They are an optimisation only: every caller falls back on XLA's own computation when
`available()` is False, i.e. when

- the environment variable GATERNET_NATIVE_KERNELS is '0' (or false/no/off: to measure or debug
  without them; a value that is no on/off spelling is an error, cpu/flags.py `switch`);
- it is unset and the CPU is not one they were measured on: the default is on only for x86-64
  CPUs with AVX-512 (measured on the 2-core AVX-512 development machine); '1' (true/yes/on)
  turns them on for any CPU they compile for (AVX2 / SSE / NEON builds, correct but unmeasured
  there);
- no C++ compiler is found (`$CXX`, else `c++`, `g++` or `clang++` on the PATH), or it fails;
- the shared library cannot be loaded or registered.

The first use compiles the sources (a few seconds) for this machine's CPU (`-march=native`, plus
GATERNET_NATIVE_CXXFLAGS) into `~/.cache/gaternet_jax/native/` (GATERNET_NATIVE_CACHE_DIR
overrides it), named by a hash of the sources, the flags, the compiler's version, jaxlib's version
and the CPU's identity, so a home directory shared by different machines keeps one library per
CPU kind. Concurrent first uses (test workers, the processes of a multi-process run) each write a
temporary file and rename it into place; the rename is atomic, so no process loads a half-written
library. Beside each library its SHA-256 (`<name>.so.sha256`, put in place before the library) is
checked before every load: a truncated or damaged library (a disk filling up, a copy cut short)
is rebuilt, and if that fails too the kernels are off for the process with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import threading

from absl import logging

from gaternet_jax.cpu import flags

# off; on for any CPU they compile for; unset: on where measured (`measured_cpu()`).
SWITCH_VARIABLE = 'GATERNET_NATIVE_KERNELS'
CACHE_VARIABLE = 'GATERNET_NATIVE_CACHE_DIR'
# Extra compiler flags, after CXX_FLAGS (e.g. '-mno-avx512f' to build and test the AVX2 tiles).
FLAGS_VARIABLE = 'GATERNET_NATIVE_CXXFLAGS'
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'gaternet_jax', 'native')
SOURCES = ('conv_forward.cc', 'conv_input_grad.cc', 'conv_weight_grad.cc')
HEADERS = ('kernel_common.h',)
# FFI target name -> the handler symbol the sources export.
TARGETS = {
  'gaternet_conv_forward': 'GaternetConvForward',
  'gaternet_conv_input_grad': 'GaternetConvInputGrad',
  'gaternet_conv_weight_grad': 'GaternetConvWeightGrad',
}
CXX_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict[str, object] = {}  # 'library': path, or 'error': why not (set once per process)


def _compiler() -> str | None:
  candidates = [os.environ['CXX']] if os.environ.get('CXX') else ['c++', 'g++', 'clang++']
  for name in candidates:
    path = shutil.which(name)
    if path:
      return path
  return None


def _cpu_identity() -> str:
  """What -march=native compiles for: the CPU's model and feature flags where Linux says."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      lines = [line for line in f if line.startswith(('model name', 'flags', 'Features'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return f'{platform.machine()} {platform.processor()}'


def measured_cpu() -> bool:
  """Whether this CPU is of the kind the kernels were tuned and measured on (x86-64, AVX-512)."""
  if platform.machine().lower() not in ('x86_64', 'amd64'):
    return False
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      return any(line.startswith('flags') and ' avx512f' in line for line in f)
  except OSError:
    return False


def _source_files() -> dict[str, bytes]:
  """Every source and header, by name (hashed into the library's name, written out to compile)."""
  folder = importlib.resources.files(__name__)
  return {name: folder.joinpath(name).read_bytes() for name in (*SOURCES, *HEADERS)}


def _flags() -> tuple[str, ...]:
  return CXX_FLAGS + tuple(os.environ.get(FLAGS_VARIABLE, '').split())


def _library_name(compiler: str, include_dir: str, files: dict[str, bytes]) -> str:
  import jaxlib

  # A compiler that cannot say its version fails below, with its own message.
  version = subprocess.run(
    [compiler, '--version'], capture_output=True, text=True, timeout=60, check=False
  ).stdout
  digest = hashlib.sha256()
  for part in (
    b''.join(files.values()),
    ' '.join(_flags()).encode(),
    version.encode(),
    jaxlib.__version__.encode(),
    include_dir.encode(),
    _cpu_identity().encode(),
  ):
    digest.update(part)
    digest.update(b'\0')
  return f'gaternet_native_{digest.hexdigest()[:20]}.so'


def _compile(compiler: str, include_dir: str, files: dict[str, bytes], destination: str) -> None:
  """Compiles the sources into `destination` (written to a temporary file, then renamed)."""
  folder = os.path.dirname(destination)
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory() as sources_dir:
    for name, content in files.items():
      with open(os.path.join(sources_dir, name), 'wb') as f:
        f.write(content)
    sources = [os.path.join(sources_dir, name) for name in SOURCES]
    fd, partial = tempfile.mkstemp(prefix='.partial-', suffix='.so', dir=folder)
    os.close(fd)
    try:
      result = subprocess.run(
        [compiler, *_flags(), f'-I{include_dir}', *sources, '-o', partial],
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
        check=False,
      )
      if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ['no output'])[0]
        raise RuntimeError(f'{os.path.basename(compiler)} failed: {first}')
      # The digest goes into place first: a library without a matching one is never loaded.
      digest_partial = partial + '.sha256'
      with open(digest_partial, 'w') as f:
        f.write(_sha256(partial))
      os.replace(digest_partial, _digest_path(destination))
      os.replace(partial, destination)
    finally:
      for leftover in (partial, partial + '.sha256'):
        if os.path.exists(leftover):
          os.remove(leftover)


def _digest_path(library: str) -> str:
  return library + '.sha256'


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def verified(library: str) -> bool:
  """Whether `library` is exactly what a build wrote (its SHA-256 matches the one written beside
  it). A truncated library is mapped but not all there: loading it died of SIGBUS, every time,
  with no message; one damaged in any other way could do worse. Those are rebuilt instead."""
  try:
    with open(_digest_path(library)) as f:
      expected = f.read().strip()
    return expected == _sha256(library)
  except OSError:
    return False


def _build_and_register() -> str:
  """The loaded library's path; raises with the reason when it cannot be had."""
  import jax

  compiler = _compiler()
  if compiler is None:
    raise RuntimeError('no C++ compiler found (set CXX, or install g++ or clang++)')
  include_dir = jax.ffi.include_dir()
  cache_dir = os.environ.get(CACHE_VARIABLE) or DEFAULT_CACHE_DIR
  files = _source_files()
  path = os.path.join(cache_dir, _library_name(compiler, include_dir, files))
  if not verified(path):
    if os.path.exists(_digest_path(path)) and os.path.exists(path):
      logging.warning('%s does not match its checksum (truncated or damaged); rebuilding', path)
    elif os.path.exists(path):
      logging.info('%s has no checksum (built by an older version); rebuilding', path)
    else:
      logging.info('Compiling gaternet_jax native CPU kernels into %s', path)
    try:
      _compile(compiler, include_dir, files, path)
    except OSError:
      # An unwritable cache (read-only home): build for this process only.
      path = os.path.join(tempfile.mkdtemp(prefix='gaternet_native_'), os.path.basename(path))
      _compile(compiler, include_dir, files, path)
    if not verified(path):  # replaced meanwhile by a damaged file: never load it
      raise RuntimeError(f'{path} does not match its checksum after a rebuild')
  library = ctypes.cdll.LoadLibrary(path)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return path


def available() -> bool:
  """True once the kernels are compiled, loaded and registered (tried once per process)."""
  with _lock:
    if not _state:
      switch = flags.switch(SWITCH_VARIABLE)
      if switch is False:
        _state['error'] = f'{SWITCH_VARIABLE}={os.environ[SWITCH_VARIABLE]}'
      elif switch is None and not measured_cpu():
        _state['error'] = (
          f'not measured on this CPU (they were on x86-64 with AVX-512); {SWITCH_VARIABLE}=1 '
          'turns them on'
        )
      else:
        try:
          _state['library'] = _build_and_register()
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
          _state['error'] = str(e)
          logging.warning(
            "gaternet_jax native CPU kernels unavailable (%s); using XLA's own convolutions", e
          )
    return 'library' in _state


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  with _lock:
    return _state.get('error')  # type: ignore[return-value]


def library_path() -> str | None:
  """The loaded library's file, when `available()`."""
  return _state.get('library') if available() else None  # type: ignore[return-value]
