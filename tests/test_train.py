"""The training system: data-parallel step, no retracing, eval masking, resume, failures."""

import dataclasses
import functools
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, TINY_FLAGS, run_on_cpu_devices, tiny_default

from gaternet_jax import configs
from gaternet_jax import data as data_lib
from gaternet_jax.data import feed
from gaternet_jax.errors import NonFiniteLossError
from gaternet_jax.training import checkpoints, dispatch, procedure, restore, steps
from gaternet_jax.training import workdir as workdir_lib

ONE_VS_EIGHT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    from conftest import tiny_default
    from gaternet_jax import data
    from gaternet_jax.training import dispatch, steps
    from gaternet_jax.data import feed
    from jax.sharding import Mesh
    assert jax.device_count() == 8, jax.devices()
    config = tiny_default('gated', batch_size=16, eval_batch_size=16)
    dataset = data.load_dataset(config.data)
    images, labels = dataset.train_arrays()
    batch = {'image': images[:16], 'label': labels[:16]}
    out = {}
    for n in (1, 8):
      setup = steps.build(config, dataset.info, mesh=Mesh(np.asarray(jax.devices()[:n]), ('data',)))
      state = steps.create_state(setup, 0)
      step, _, _ = steps.compile_steps(setup)
      key = jax.random.key(42)
      for _ in range(2):
        state, metrics = step(state, feed.to_global(batch, setup.data_sharding), key)
      out[n] = (jax.device_get(metrics), jax.device_get(state.params),
                jax.device_get(state.batch_stats))
    # On 8 devices, one dispatch of 2 steps equals 2 single steps on the same resident batches.
    config.steps_per_dispatch = 2
    setup = steps.build(config, dataset.info)
    key = jax.random.key(42)
    dispatch = dispatch.TrainDispatch(
      setup, dataset, start_step=0, seed=0, data_key=jax.random.key(1), key=key)
    step = steps.compile_steps(setup)[0]
    chunked, _ = dispatch(steps.create_state(setup, 0), 0, 2)
    single = steps.create_state(setup, 0)
    for s in range(2):
      single, _ = step(single, dispatch.resident.batch(s), key)
    for a, b in zip(jax.tree.leaves(chunked.params), jax.tree.leaves(single.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    m1, p1, s1 = out[1]
    m8, p8, s8 = out[8]
    for k in m1:
      np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(p1) + jax.tree.leaves(s1), jax.tree.leaves(p8) + jax.tree.leaves(s8)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print(json.dumps({k: float(v) for k, v in m1.items()}))
""")


@pytest.mark.slow
def test_one_device_and_eight_devices_agree():
  metrics = run_on_cpu_devices(ONE_VS_EIGHT, 8)
  assert np.isfinite(metrics['loss']) and 0 < metrics['gate_density'] <= 1


@pytest.fixture(scope='module')
def small_setup():
  config = tiny_default('gated')
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  return config, dataset, setup


@pytest.mark.slow
def test_train_step_compiles_once(small_setup):
  """Every chunk length shares one compiled program (the loop bound is traced)."""
  config, dataset, setup = small_setup
  config = config.copy_and_resolve_references()
  config.steps_per_dispatch = 3
  setup = steps.build(config, dataset.info)
  state = steps.create_state(setup, 0)
  trainer = dispatch.TrainDispatch(
    setup, dataset, start_step=0, seed=0, data_key=jax.random.key(1), key=jax.random.key(0)
  )
  step = 0
  for n in (1, 3, 2, 3):
    state, metrics = trainer(state, step, n)
    step += n
    assert metrics['loss'].shape == (3,)
  assert trainer._chunk._cache_size() == 1  # noqa: SLF001 - no retracing across chunks
  assert int(state.step) == step == 9
  with pytest.raises(ValueError, match='1 to 3 steps'):
    trainer(state, step, 4)


@pytest.mark.slow
@pytest.mark.parametrize('loop', [False, True])
def test_eval_counts_every_example_once(small_setup, loop):
  """297 test examples with eval batch 100: 3 padded batches, every example counted once, whether
  the batches are scored one call each or in one on-device loop."""
  config, dataset, setup = small_setup
  state = steps.create_state(setup, 0)
  evaluator = dispatch.Evaluator(setup, dataset, loop=loop)
  assert evaluator.loop == loop
  metrics = evaluator(state, 'test')
  assert metrics['examples'] == dataset.info.split_size('test') == 297
  # Reference: the same model on all 297 examples at once, no padding.
  images, labels = dataset.eval_arrays('test')
  x = steps.preprocess(config, dataset.info, jnp.asarray(images), None)
  logits, aux = setup.model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, x, train=False
  )
  error = 100 * (1 - np.mean(np.argmax(np.asarray(logits), -1) == labels))
  np.testing.assert_allclose(metrics['top1_error'], error, atol=1e-3)
  np.testing.assert_allclose(metrics['gate_density'], float(jnp.mean(aux['gates'])), rtol=1e-5)


def test_resident_batches_are_deterministic_and_cover_the_epoch(small_setup):
  config, dataset, setup = small_setup
  images, labels = dataset.train_arrays()
  resident = feed.ResidentTrainData(
    images,
    labels,
    num_train=dataset.info.num_train,
    batch_size=config.batch_size,
    sharding=setup.data_sharding,
    key=jax.random.key(0),
  )
  seen = np.concatenate(
    [np.asarray(resident.batch(s)['label']) for s in range(resident.steps_per_epoch)]
  )
  assert len(seen) == resident.steps_per_epoch * config.batch_size
  np.testing.assert_array_equal(resident.batch(3)['image'], resident.batch(3)['image'])
  assert not np.array_equal(
    resident.batch(0)['image'], resident.batch(resident.steps_per_epoch)['image']
  )  # reshuffled
  # One epoch draws each example at most once.
  counts = np.bincount(seen, minlength=10)
  np.testing.assert_array_less(counts, np.bincount(labels, minlength=10) + 1)


def test_plain_run_end_to_end(tmp_path):
  workdir = str(tmp_path / 'plain')
  results = procedure.train_and_evaluate(tiny_default('plain'), workdir)
  assert results['step'] == 6 and results['eval']['examples'] == 297
  assert results['params'] > 0 and results['gated_filters'] == 0
  # The wall time split into setup, the first dispatch (compilation), eval, checkpoints, training.
  split = results['time_split_s']
  assert set(split) == {'setup', 'first_dispatch', 'eval', 'checkpoint', 'train'}
  assert all(v >= 0 for v in split.values()) and split['first_dispatch'] > 0
  assert sum(split.values()) == pytest.approx(results['wall_time_s'], abs=0.1)
  stored = json.load(open(os.path.join(workdir, 'results.json')))
  assert stored['step'] == 6 and stored['name'] == 'default'
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert checkpoints.latest_step(workdir) == 6
  assert configs.variant_of(workdir_lib.load_config(workdir)) == 'plain'
  # Running again resumes at the end: nothing to train, same step.
  again = procedure.train_and_evaluate(tiny_default('plain'), workdir)
  assert again['step'] == 6


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'nan')
  config = tiny_default('plain', max_steps=40, checkpoint_every_steps=1)
  config.schedule.name = 'constant'
  config.optimizer.learning_rate = 1e12
  with pytest.raises(NonFiniteLossError, match=r'non-finite .* at step (\d+)') as info:
    procedure.train_and_evaluate(config, workdir)
  bad_step = int(info.value.args[0].split('at step ')[1].split(';')[0])
  last = checkpoints.latest_step(workdir)
  assert last is not None and last < bad_step
  state = restore.load_state(workdir).state
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_checkpoint_min_interval_defaults_per_platform():
  config = tiny_default('plain')
  assert config.checkpoint_min_interval_s is None
  assert checkpoints.min_interval_s(config, 'cpu') == 0.0
  for platform in ('gpu', 'tpu'):
    assert checkpoints.min_interval_s(config, platform) == checkpoints.ACCELERATOR_MIN_INTERVAL_S
  config.checkpoint_min_interval_s = 5.0
  assert checkpoints.min_interval_s(config, 'cpu') == checkpoints.min_interval_s(config, 'gpu') == 5


@pytest.mark.slow
def test_min_interval_spaces_periodic_checkpoints_but_saves_the_last_step(tmp_path):
  """checkpoint_every_steps=2 with a floor no run reaches: only the final step is saved, and the
  run trains to the same result as with every periodic checkpoint."""
  spaced = procedure.train_and_evaluate(
    tiny_default('plain', checkpoint_every_steps=2, checkpoint_min_interval_s=1e6),
    str(tmp_path / 'spaced'),
  )
  assert checkpoints.steps(str(tmp_path / 'spaced')) == [6]
  every = procedure.train_and_evaluate(
    tiny_default('plain', checkpoint_every_steps=2), str(tmp_path / 'every')
  )
  assert checkpoints.steps(str(tmp_path / 'every')) == [2, 4, 6]
  assert spaced['eval'] == every['eval'] and spaced['step'] == every['step'] == 6


def test_all_finite_checks_every_element_of_every_leaf():
  tree = {
    'a': jnp.ones((3, 4), jnp.float32),
    'b': [jnp.zeros((5,), jnp.bfloat16), jnp.full((2, 2), 3e38, jnp.float32)],
  }
  assert bool(steps.all_finite(tree))  # 3e38 is finite; its squared norm would overflow to inf
  for path, value in (('a', jnp.inf), ('a', -jnp.inf), ('a', jnp.nan)):
    bad = dict(tree, a=tree['a'].at[2, 3].set(value))
    assert not bool(steps.all_finite(bad)), (path, value)
  bad = dict(tree, b=[tree['b'][0].at[4].set(jnp.nan), tree['b'][1]])
  assert not bool(steps.all_finite(bad))
  assert bool(steps.all_finite({}))


@pytest.mark.slow
def test_finite_loss_with_nonfinite_updates_is_flagged(small_setup):
  """The step's `finite` also covers the updates (a finite loss can come with overflowed
  gradients in bfloat16): one poisoned element of one update leaf turns it off."""
  config, dataset, setup = small_setup
  tx = setup.tx

  def poisoned_update(grads, opt_state, params=None):
    updates, opt_state = tx.update(grads, opt_state, params)
    leaves, treedef = jax.tree.flatten(updates)
    leaves[-1] = leaves[-1].ravel().at[0].set(jnp.inf).reshape(leaves[-1].shape)
    return jax.tree.unflatten(treedef, leaves), opt_state

  images, labels = dataset.train_arrays()
  batch = {'image': jnp.asarray(images[:16]), 'label': jnp.asarray(labels[:16])}
  for transform, expected in (
    (tx, True),
    (optax.GradientTransformation(tx.init, poisoned_update), False),
  ):
    variant = dataclasses.replace(setup, tx=transform)
    state = steps.create_state(variant, 0)
    _, metrics = jax.jit(functools.partial(steps.train_step, setup=variant))(
      state, batch, jax.random.key(0)
    )
    assert bool(jnp.isfinite(metrics['loss']))
    assert bool(metrics['finite']) is expected


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, cli):
  workdir = str(tmp_path / 'killed')
  flags = [
    '--config',
    'experiments/default.py:plain',
    '--workdir',
    workdir,
    '--config.max_steps=60',
    '--config.checkpoint_every_steps=10',
    '--config.log_every_steps=10',
    '--config.eval_every_epochs=100',
  ]
  env = dict(os.environ)
  proc = subprocess.Popen(
    [sys.executable, '-m', 'gaternet_jax.main', 'train', *flags],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:

    def finished_checkpoints():  # Orbax renames a checkpoint to its step only once complete
      directory = os.path.join(workdir, 'checkpoints')
      return [d for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []

    deadline = time.time() + 300
    while time.time() < deadline and not finished_checkpoints():
      time.sleep(0.1)
    assert finished_checkpoints(), 'no checkpoint appeared'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  first = checkpoints.latest_step(workdir)
  assert first is not None and first < 60
  result = cli('train', *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'Resumed {workdir} from step {first}' in result.stderr
  final = json.loads(result.stdout.strip().splitlines()[-1])
  assert final['step'] == final['total_steps'] == 60


def _one_error_line(result):
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(
  'extra,message',
  [
    (['--config.optimizer.nope=1'], 'unknown config field'),
    (['--config.data.name=nope'], 'data.name'),
    (
      ['--config.data.name=imagefolder', '--config.data.data_dir=/nonexistent/images'],
      '/nonexistent/images',
    ),
    (['--config.data.name=cifar10', '--config.data.data_dir=/nonexistent/tfds'], 'cifar10'),
  ],
)
def test_bad_inputs_give_one_clear_line(tmp_path, cli, extra, message):
  result = cli(
    'train',
    '--config',
    'experiments/default.py:plain',
    '--workdir',
    str(tmp_path / 'w'),
    *TINY_FLAGS,
    *extra,
  )
  assert message in _one_error_line(result)


@pytest.mark.slow
def test_unwritable_workdir(tmp_path, cli):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = cli(
    'train',
    '--config',
    'experiments/default.py:plain',
    '--workdir',
    str(blocker / 'w'),
    *TINY_FLAGS,
  )
  assert 'not writable' in _one_error_line(result)


@pytest.mark.slow
def test_resume_with_conflicting_config_fails_and_keeps_checkpoints(tmp_path, cli):
  workdir = tmp_path / 'w'
  base = ['--config', 'experiments/default.py:plain', '--workdir', str(workdir), *TINY_FLAGS]
  assert cli('train', *base).returncode == 0
  before = sorted(os.listdir(workdir / 'checkpoints'))
  line = _one_error_line(cli('train', *base, '--config.optimizer.learning_rate=0.5'))
  assert 'different config' in line and 'optimizer.learning_rate' in line
  assert sorted(os.listdir(workdir / 'checkpoints')) == before


@pytest.mark.slow
def test_evaluate_command(tmp_path, cli):
  workdir = tmp_path / 'w'
  assert (
    cli(
      'train', '--config', 'experiments/default.py:plain', '--workdir', str(workdir), *TINY_FLAGS
    ).returncode
    == 0
  )
  result = cli('evaluate', '--workdir', str(workdir), '--json')
  assert result.returncode == 0, result.stderr[-2000:]
  data = json.loads(result.stdout.strip().splitlines()[-1])
  assert data['examples'] == 297 and data['step'] == 6 and data['gated_filters'] == 0
  stored = json.load(open(workdir / 'results.json'))
  np.testing.assert_allclose(data['top1_error'], stored['eval']['top1_error'])
  assert 'no checkpoint' in _one_error_line(cli('evaluate', '--workdir', str(tmp_path)))


def test_tfds_mock_data_drives_training(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = tiny_default('plain', max_steps=2, batch_size=8, eval_batch_size=8)
  config.data.name = 'cifar10'
  with tfds.testing.mock_data(num_examples=24):
    results = procedure.train_and_evaluate(config, str(tmp_path / 'mock'))
  assert results['step'] == 2 and results['eval']['examples'] > 0


def test_sweep_parses_grid():
  from gaternet_jax.commands.sweep import parse_sweep  # noqa: PLC0415

  assert parse_sweep(['a.b=1,2', 'c=x']) == [{'a.b': '1', 'c': 'x'}, {'a.b': '2', 'c': 'x'}]


@pytest.mark.slow
def test_sweep_command_runs_each_point(tmp_path, cli):
  result = cli(
    'sweep',
    '--config',
    'experiments/default.py:plain',
    '--workdir',
    str(tmp_path),
    '--sweep',
    'optimizer.learning_rate=0.05,0.1',
    *TINY_FLAGS,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  points = [json.loads(l)['point'] for l in result.stdout.strip().splitlines()]
  assert points == [{'optimizer.learning_rate': '0.05'}, {'optimizer.learning_rate': '0.1'}]
  for lr in ('0.05', '0.1'):
    stored = workdir_lib.load_config(str(tmp_path / f'optimizer.learning_rate={lr}'))
    assert stored.optimizer.learning_rate == float(lr)
  # The summary of both points, scored on the evaluation split once (cached beside each run).
  summary = json.loads((tmp_path / 'sweep.json').read_text())
  assert [p['point'] for p in summary['points']] == points
  assert summary['fields'] == ['optimizer.learning_rate'] and summary['split'] == 'test'
  for row, lr in zip(summary['points'], ('0.05', '0.1')):
    scored = json.loads(
      (tmp_path / f'optimizer.learning_rate={lr}' / 'evaluation.json').read_text()
    )
    assert row['top1_error'] == scored['top1_error'] and row['step'] == scored['step'] == 6
    assert row['gate_density'] == 1.0 and row['macs'] == scored['macs'] > 0
  assert len((tmp_path / 'sweep.md').read_text().splitlines()) == 6
  assert (tmp_path / 'sweep.png').stat().st_size > 1000
  bad = cli(
    'sweep',
    '--config',
    'experiments/default.py:plain',
    '--workdir',
    str(tmp_path),
    '--sweep',
    'nope=1',
  )
  assert 'unknown config field' in _one_error_line(bad)


@pytest.mark.slow
def test_failed_first_attempt_does_not_block_the_corrected_command(tmp_path, cli):
  workdir = str(tmp_path / 'w')
  base = ['--config', 'experiments/default.py:plain', '--workdir', workdir, *TINY_FLAGS]
  assert 'batch_size must be >= 1' in _one_error_line(cli('train', *base, '--config.batch_size=0'))
  assert cli('train', *base).returncode == 0


@pytest.mark.slow
def test_distributed_without_a_cluster_is_one_line(tmp_path, cli):
  result = cli(
    'train',
    '--config',
    'experiments/default.py:plain',
    '--workdir',
    str(tmp_path / 'w'),
    '--distributed=true',
    *TINY_FLAGS,
  )
  assert 'jax.distributed.initialize() failed' in _one_error_line(result)


@pytest.mark.slow
def test_resume_on_data_of_another_size_is_refused(tmp_path, cli):
  from PIL import Image  # noqa: PLC0415

  def folder(root, per_class):
    for c in ('a', 'b'):
      os.makedirs(root / 'train' / c, exist_ok=True)
      for i in range(per_class):
        Image.new('RGB', (8, 8), (i * 20, 40 if c == 'a' else 200, 0)).save(
          root / 'train' / c / f'{i}.png'
        )
    return root

  small, large = folder(tmp_path / 'small', 30), folder(tmp_path / 'large', 40)
  base = [
    '--config', 'experiments/default.py:plain', '--workdir', str(tmp_path / 'w'), *TINY_FLAGS,
    '--config.data.name=imagefolder', '--config.data.holdout=10', '--config.data.eval_split=holdout',
    '--config.batch_size=10', '--config.eval_batch_size=10',
  ]  # fmt: skip
  first = cli('train', *base, f'--config.data.data_dir={small}', '--config.max_steps=3')
  assert first.returncode == 0, first.stderr[-2000:]
  again = cli('train', *base, f'--config.data.data_dir={large}', '--config.max_steps=3')
  assert 'training examples' in _one_error_line(again)


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_line_and_not_overwritten(tmp_path, cli):
  workdir = tmp_path / 'w'
  base = ['--config', 'experiments/default.py:plain', '--workdir', str(workdir), *TINY_FLAGS]
  assert cli('train', *base).returncode == 0
  # Truncate every data file of the newest checkpoint.
  newest = workdir / 'checkpoints' / '6'
  damaged = 0
  for root, _, files in os.walk(newest):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 100 and not name.endswith('.json'):
        with open(path, 'r+b') as f:
          f.truncate(10)
        damaged += 1
  assert damaged
  os.remove(workdir / 'results.json')  # as if killed after its last checkpoint: resume needs it
  snapshot = sorted(os.listdir(workdir / 'checkpoints'))
  result = cli('evaluate', '--workdir', str(workdir))
  line = _one_error_line(result)
  assert 'checkpoint 6' in line and str(workdir) in line
  assert 'Event loop is closed' not in result.stderr  # asyncio's noise at exit is kept out
  line = _one_error_line(cli('train', *base))
  assert 'checkpoint 6' in line
  assert sorted(os.listdir(workdir / 'checkpoints')) == snapshot
