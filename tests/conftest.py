"""Test setup: CPU flags before JAX starts, a shared compilation cache, helpers to run the CLI."""

import os
import subprocess
import sys
import tempfile

from gaternet_jax import environment  # noqa: E402 - imports no JAX
from gaternet_jax.cpu import flags as cpu_flags

# The settings the `gaternet` command applies, before JAX starts.
environment.prepare()
# One persistent compilation cache for the whole test session, in-process and in subprocesses:
# many tests compile the same tiny models.
_CACHE = os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'gaternet_test_xla_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gaternet_jax import data as data_lib  # noqa: E402
from gaternet_jax.training import steps  # noqa: E402

jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, 'experiments', 'default.py')


def run_cli(*args, timeout=600, env=None):
  """Runs `gaternet ARGS` in a subprocess; returns CompletedProcess with text output."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(
    [sys.executable, '-m', 'gaternet_jax.main', *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
    env=full_env,
  )


def has_logged(workdir: str) -> bool:
  """Whether a training run in `workdir` has written its first scalars to its TensorBoard event
  file (so it is past compilation and under way)."""
  names = (
    [f for f in os.listdir(workdir) if f.startswith('events')] if os.path.isdir(workdir) else []
  )
  return bool(names) and os.path.getsize(os.path.join(workdir, names[0])) > 200


def run_on_cpu_devices(script: str, devices: int, timeout: int = 600) -> dict:
  """Runs `python -c script` on `devices` simulated CPU devices; returns its last line as JSON."""
  flags = f'--xla_force_host_platform_device_count={devices} {cpu_flags.CPU_XLA_FLAGS}'
  result = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    env=dict(os.environ, XLA_FLAGS=flags),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  import json  # noqa: PLC0415

  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def cli():
  return run_cli


def load_experiment(name: str, variant: str | None = None):
  """An experiment's config, as `--config experiments/NAME.py:VARIANT` would load it."""
  import importlib.util  # noqa: PLC0415

  path = os.path.join(REPO, 'experiments', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'experiment_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def tiny_setup_and_batch(variant: str, batch_size: int = 16):
  """The tiny default experiment's step setup and one batch of its embedded training images."""
  config = tiny_default(variant)
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  images, labels = dataset.train_arrays()
  batch = {'image': jnp.asarray(images[:batch_size]), 'label': jnp.asarray(labels[:batch_size])}
  return setup, batch


def train_step_calls(setup, batch, module_type) -> int:
  """How many `module_type` calls one traced training step makes (backbone and gater)."""
  count = 0

  def note(next_fun, args, kwargs, context):
    nonlocal count
    count += isinstance(context.module, module_type) and context.method_name == '__call__'
    return next_fun(*args, **kwargs)

  state = steps.create_state(setup, 0)
  with nn.intercept_methods(note):
    jax.eval_shape(
      functools.partial(steps.train_step, setup=setup), state, batch, jax.random.key(0)
    )
  return count


def tiny_default(variant: str = 'gated', **overrides):
  """The default experiment with a budget of a few steps (unlocked, editable)."""
  config = load_experiment('default', variant)
  config.max_steps = 6
  config.checkpoint_every_steps = 3
  config.log_every_steps = 3
  config.eval_every_epochs = 100.0
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


TINY_FLAGS = [
  '--config.max_steps=6',
  '--config.checkpoint_every_steps=3',
  '--config.log_every_steps=3',
  '--config.eval_every_epochs=100',
]


@pytest.fixture(scope='session')
def gated_run(tmp_path_factory):
  """One tiny three-stage GaterNet run on the default data, shared by several tests."""
  from gaternet_jax.training import procedure  # noqa: PLC0415

  workdir = str(tmp_path_factory.mktemp('gated_run'))
  results = procedure.train_and_evaluate(tiny_default('gated'), workdir)
  return workdir, results


def perturbed(tree, seed):
  """Batch-norm parameters and statistics moved off their initial values (a mis-sliced BN entry
  then shows in the logits); kernels keep their (random) initialisation."""
  rng = np.random.default_rng(seed)

  def move(path, x):
    name = path[-1].key
    if name == 'var':
      return x * rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if name in ('scale', 'mean') or (name == 'bias' and 'bn' in str(path[-2].key)):
      return x + rng.normal(0, 0.2, x.shape).astype(np.float32)
    return x

  return jax.tree_util.tree_map_with_path(move, tree)


def check_zero_gate(
  monkeypatch, model, variables, x, layout, layer, channel, sample=1, neighbour=1
):
  """Evaluation mode with one gate at 0 (`sample`, gated layer `layer`, filter `channel`): that
  channel of that layer's eq.-4 output (`layers.apply_gate`) is exactly zero for that sample
  while channel `channel + neighbour` and the other samples' channel are not; every other
  sample's output is bit-identical to the all-open one, this sample's is not; gates=None is all
  gates open. Returns the gated layers' eq.-4 outputs in call order."""
  import jax.numpy as jnp  # noqa: PLC0415

  from gaternet_jax.layout import layer_offsets, total_filters  # noqa: PLC0415
  from gaternet_jax.models import layers  # noqa: PLC0415

  n, c = x.shape[0], total_filters(layout)
  gates = jnp.ones((n, c)).at[sample, layer_offsets(layout)[layer] + channel].set(0.0)
  products = []
  original = layers.apply_gate

  def spy(y, gate):
    out = original(y, gate)
    products.append(np.asarray(out))
    return out

  monkeypatch.setattr(layers, 'apply_gate', spy)
  masked = np.asarray(model.apply(variables, x, gates=gates, train=False))
  monkeypatch.setattr(layers, 'apply_gate', original)
  gated_output = products[layer]
  np.testing.assert_array_equal(gated_output[sample, ..., channel], 0.0)
  assert np.abs(gated_output[sample, ..., channel + neighbour]).sum() > 0
  assert np.abs(gated_output[sample - 1, ..., channel]).sum() > 0
  full = np.asarray(model.apply(variables, x, gates=jnp.ones((n, c)), train=False))
  others = [i for i in range(n) if i != sample]
  np.testing.assert_array_equal(full[others], masked[others])
  assert not np.allclose(full[sample], masked[sample])
  np.testing.assert_array_equal(full, np.asarray(model.apply(variables, x, train=False)))
  return products
