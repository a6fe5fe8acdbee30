"""Faults and hostile input: a second run on a workdir, SIGTERM, corrupt checkpoints, bad values.

Bit-identical outcomes are checked through `checksums.json`, the digest of every checkpoint's
arrays that training writes beside its checkpoints.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_FLAGS, has_logged, tiny_default

from gaternet_jax.training import procedure, restore
from gaternet_jax.training import workdir as workdir_lib

PLAIN = ['--config', 'experiments/default.py:plain']
LONG = ['--config.max_steps=60', '--config.log_every_steps=5', '--config.eval_every_epochs=100']


def _one_error_line(result):
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  return errors[0]


def _digest(workdir, step):
  return json.load(open(os.path.join(workdir, 'checksums.json')))[str(step)]


def _start(args):
  return subprocess.Popen(
    [sys.executable, '-m', 'gaternet_jax.main', 'train', *args],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _signal_when(args, ready, sig):
  """Starts `gaternet train ARGS`, sends `sig` once `ready()` (or the run ended); (exit, stderr)."""
  proc = _start(args)
  try:
    assert _wait_for(lambda: ready() or proc.poll() is not None)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  return proc.returncode, err


def _wait_for(predicate, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


@pytest.fixture(scope='module')
def undisturbed(
  tmp_path_factory,
):
  """A plain 60-step run nobody touched: the reference for bit-identical outcomes."""
  from conftest import run_cli  # noqa: PLC0415

  workdir = str(tmp_path_factory.mktemp('undisturbed') / 'w')
  result = run_cli(
    'train', *PLAIN, '--workdir', workdir, *LONG, '--config.checkpoint_every_steps=1000'
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_and_the_first_is_untouched(tmp_path, cli, undisturbed):
  workdir = str(tmp_path / 'w')
  args = [*PLAIN, '--workdir', workdir, *LONG, '--config.checkpoint_every_steps=1000']
  first = _start(args)
  try:
    assert _wait_for(lambda: os.path.exists(os.path.join(workdir, 'lock.json')))
    line = _one_error_line(cli('train', *args, '--config.seed=1'))
    assert 'in use by another gaternet run' in line and str(first.pid) in line
    first.communicate(timeout=600)
  finally:
    first.kill()
  assert first.returncode == 0
  assert _digest(workdir, 60) == _digest(undisturbed, 60)
  assert workdir_lib.load_config(workdir).seed == 0
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))  # released at the end


@pytest.mark.slow
@pytest.mark.parametrize('sig,code,every', [(signal.SIGINT, 130, 1000), (signal.SIGTERM, 143, 1)])
def test_signal_checkpoints_the_current_step_and_resumes_bit_identically(
  tmp_path, cli, undisturbed, sig, code, every
):
  """Ctrl-C between checkpoint steps, and SIGTERM when every step is a checkpoint step (every=1:
  the stop is still honoured there). The two cases cover both signals and both kinds of step;
  SIGTERM between checkpoint steps is also in test_device_loops and test_multiprocess."""
  workdir = str(tmp_path / 'w')
  args = [*PLAIN, '--workdir', workdir, *LONG, f'--config.checkpoint_every_steps={every}']
  returncode, err = _signal_when(args, lambda: has_logged(workdir), sig)
  assert returncode == code, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith(f'gaternet: stopped by {sig.name} at step')]
  assert len(lines) == 1 and 'run the same command again to resume' in lines[0], err[-2000:]
  step = int(lines[0].split('at step ')[1].split(';')[0])
  kept = restore.checkpoints.steps(workdir)
  assert 0 < step < 60 and kept[-1] == step and (every == 1 or kept == [step])
  again = cli('train', *args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f'Resumed {workdir} from step {step}' in again.stderr
  assert _digest(workdir, 60) == _digest(undisturbed, 60)


@pytest.mark.slow
@pytest.mark.parametrize('sig,code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_at_a_stage_boundary_stops_with_one_line_and_resumes(tmp_path, cli, sig, code):
  # Sent the moment stage 1 has finished: between stages, outside any training loop (or, if
  # stage 2 is already under way, in its loop). Either way: one line, 130/143, resumable.
  workdir = str(tmp_path / 'w')
  args = ['--config', 'experiments/default.py:gated', '--workdir', workdir, *TINY_FLAGS]
  stage1 = os.path.join(workdir, workdir_lib.STAGE_BACKBONE, 'results.json')
  returncode, err = _signal_when(args, lambda: os.path.exists(stage1), sig)
  assert returncode == code, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith(f'gaternet: stopped by {sig.name}')]
  assert len(lines) == 1 and 'Traceback' not in err, err[-2000:]
  assert not workdir_lib.is_finished(os.path.join(workdir, workdir_lib.STAGE_JOINT))
  again = cli('train', *args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert workdir_lib.is_finished(workdir)


@pytest.mark.slow
def test_ctrl_c_while_a_run_sets_up_is_one_line(tmp_path):
  workdir = str(tmp_path / 'w')
  # config.json is written before the data and the steps are built: setup is under way.
  config = os.path.join(workdir, 'config.json')
  returncode, err = _signal_when(
    [*PLAIN, '--workdir', workdir, *TINY_FLAGS], lambda: os.path.exists(config), signal.SIGINT
  )
  assert returncode == 130, err[-2000:]
  assert 'Traceback' not in err and err.count('gaternet: stopped by SIGINT') == 1, err[-2000:]


@pytest.mark.slow
def test_flipped_byte_is_one_error_line_naming_the_step(tmp_path, cli):
  workdir = tmp_path / 'w'
  assert cli('train', *PLAIN, '--workdir', str(workdir), *TINY_FLAGS).returncode == 0
  flipped = 0
  for root, _, files in os.walk(workdir / 'checkpoints' / '6'):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 1000 and not name.endswith('.json'):
        data = bytearray(open(path, 'rb').read())
        data[len(data) // 2] ^= 0x01
        open(path, 'wb').write(bytes(data))
        flipped += 1
  assert flipped
  line = _one_error_line(cli('evaluate', '--workdir', str(workdir)))
  assert 'checkpoint 6' in line


@pytest.mark.slow
def test_corrupt_latest_checkpoint_resumes_from_an_earlier_one_when_asked(tmp_path, cli):
  workdir = tmp_path / 'w'
  args = [*PLAIN, '--workdir', str(workdir), *TINY_FLAGS]
  assert cli('train', *args).returncode == 0
  os.remove(workdir / 'results.json')  # as if the run had been killed after its last checkpoint
  table = json.load(open(workdir / 'checksums.json'))
  table['6'] = '0' * 64  # the stored digest no longer matches the arrays
  json.dump(table, open(workdir / 'checksums.json', 'w'))
  line = _one_error_line(cli('train', *args))
  assert 'checkpoint 6' in line and '--resume_step=3' in line
  resumed = cli('train', *args, '--resume_step=3')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert sorted(os.listdir(workdir / 'superseded')) == ['6']  # set aside, not deleted
  assert json.loads(resumed.stdout.strip().splitlines()[-1])['step'] == 6


@pytest.mark.slow
def test_rerun_of_a_finished_run_leaves_its_results_alone(tmp_path, cli):
  workdir = tmp_path / 'w'
  args = [*PLAIN, '--workdir', str(workdir), *TINY_FLAGS]
  assert cli('train', *args).returncode == 0
  before = (workdir / 'results.json').read_bytes()
  again = cli('train', *args)
  assert again.returncode == 0 and (workdir / 'results.json').read_bytes() == before


@pytest.mark.slow
def test_refused_resume_does_not_write_its_config(tmp_path, cli):
  workdir = tmp_path / 'w'
  args = [*PLAIN, '--workdir', str(workdir), *TINY_FLAGS]
  assert cli('train', *args).returncode == 0
  os.remove(workdir / 'config.json')
  result = cli('train', *args, '--config.model.width=0.5')
  assert 'does not match the model' in _one_error_line(result)
  assert not (workdir / 'config.json').exists()


@pytest.mark.slow
@pytest.mark.parametrize(
  'override',
  [
    '--config.optimizer.learning_rate=-1',
    '--config.gating.l1_weight=-1',
    '--config.gater.dropout_rate=2',
    '--config.model.width=0',
    '--config.schedule.num_epochs=0',
    '--config.max_steps=0',
    '--config.gater.bottleneck=0',
  ],
)
def test_nonsense_values_are_refused_before_anything_is_written(tmp_path, cli, override):
  workdir = tmp_path / 'w'
  result = cli('train', '--config', 'experiments/default.py', '--workdir', str(workdir), override)
  line = _one_error_line(result)
  assert override.split('=')[0][len('--config.') :] in line
  assert [l for l in result.stderr.splitlines() if l.strip()] == [line]  # nothing before it
  assert not workdir.exists()


@pytest.mark.slow
def test_empty_workdir_is_refused(cli):
  assert 'workdir' in _one_error_line(cli('train', *PLAIN, '--workdir='))


@pytest.mark.slow
def test_missing_config_file_names_the_file_without_the_variant(cli):
  line = _one_error_line(cli('train', '--config', 'experiments/nope.py:gated', '--workdir', 'x'))
  assert "'experiments/nope.py' not found" in line or 'experiments/nope.py' in line
  assert ':gated' not in line


@pytest.mark.slow
def test_sweep_of_fields_whose_default_is_none(tmp_path, cli):
  result = cli(
    'sweep', *PLAIN, '--workdir', str(tmp_path), *TINY_FLAGS[1:],
    '--sweep', 'max_steps=2,3', '--sweep', 'procedure.joint_learning_rate=0.05',
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  steps = [json.loads(l)['step'] for l in result.stdout.strip().splitlines()]
  assert steps == [2, 3]


@pytest.mark.slow
def test_sweep_checks_every_point_before_training_any(tmp_path, cli):
  line = _one_error_line(
    cli(
      'sweep',
      *PLAIN,
      '--workdir',
      str(tmp_path),
      *TINY_FLAGS,
      '--sweep',
      'optimizer.learning_rate=0.1,-1',
    )  # fmt: skip
  )
  assert 'optimizer.learning_rate' in line and not any(tmp_path.iterdir())
  assert '--sweep' in _one_error_line(cli('sweep', *PLAIN, '--workdir', str(tmp_path)))
  # A value only the data can refute (the default set has 1,500 training images), in the last
  # point: refused before the first point trains, naming the point.
  line = _one_error_line(
    cli('sweep', *PLAIN, '--workdir', str(tmp_path), *TINY_FLAGS, '--sweep', 'batch_size=100,2000')
  )
  assert "sweep point {'batch_size': '2000'}" in line and '1500 training examples' in line
  assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_stage_streams_differ_within_a_run_and_across_seeds(tmp_path):
  """Stage 2 of seed 0 is not stage 1 of seed 1, and no two stages of one run share a stream."""
  digests = {}
  for seed in (0, 1):
    workdir = str(tmp_path / f'seed{seed}')
    config = tiny_default('gated', seed=seed, max_steps=3, checkpoint_every_steps=3)
    config.gater.extractor = config.model.backbone  # the case where streams used to coincide
    procedure.train_and_evaluate(config, workdir)
    for stage in workdir_lib.STAGES[:2]:
      digests[seed, stage] = _digest(os.path.join(workdir, stage), 3)
  assert len(set(digests.values())) == 4, digests
