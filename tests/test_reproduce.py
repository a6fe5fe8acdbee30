"""`gaternet reproduce`: plain, gated and control runs per seed, resumable, with a table."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, TINY_FLAGS, tiny_default

from gaternet_jax import configs
from gaternet_jax.commands import reproduce
from gaternet_jax.errors import UserError
from gaternet_jax.training import checkpoints, procedure, restore
from gaternet_jax.training import workdir as workdir_lib


def _files(workdir):
  """Every file under `workdir` (but the summary) with its modification time."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if not name.startswith('reproduce.'):
        out[path] = os.path.getmtime(path)
  return out


@pytest.fixture(scope='module')
def reproduced(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reproduce'))
  summary = reproduce.reproduce(tiny_default('gated'), workdir, [0, 1])
  return workdir, summary


@pytest.mark.slow
def test_reproduce_trains_plain_gated_and_control_per_seed_and_writes_the_table(reproduced):
  workdir, summary = reproduced
  assert summary['seeds'] == [0, 1] and summary['split'] == 'test'
  for kind in reproduce.RUNS:
    for seed in (0, 1):
      run = reproduce.run_dir(workdir, seed, kind)
      assert workdir_lib.is_finished(run)
      row = summary['runs'][kind]['per_seed'][str(seed)]
      assert 0 <= row['top1_error'] <= 100 and row['macs'] > 0
  # The gated run's stage 1 is its seed's plain run; its stage 2 the other seed's plain run.
  gated0 = workdir_lib.load_config(reproduce.run_dir(workdir, 0, 'gated'))
  assert gated0.init.backbone == reproduce.run_dir(workdir, 0, 'plain')
  assert gated0.init.gater == reproduce.run_dir(workdir, 1, 'plain')
  assert gated0.seed == 0
  assert workdir_lib.load_config(reproduce.run_dir(workdir, 1, 'control')).seed == 1
  # The control trains as many steps again as the joint stage, on top of its plain run.
  control = workdir_lib.read_results(reproduce.run_dir(workdir, 0, 'control'))
  joint = workdir_lib.read_results(reproduce.run_dir(workdir, 0, 'gated'))
  assert control['step'] == joint['step'] == 6
  assert summary['runs']['plain']['gate_density']['mean'] == 1.0
  # Wall times: each run's own training (the gated run's: its joint stage).
  for kind in reproduce.RUNS:
    for seed in (0, 1):
      wall = summary['runs'][kind]['per_seed'][str(seed)]['wall_time_s']
      assert wall == workdir_lib.read_results(reproduce.run_dir(workdir, seed, kind))['wall_time_s']
      assert wall > 0
  joint = workdir_lib.join(reproduce.run_dir(workdir, 0, 'gated'), workdir_lib.STAGE_JOINT)
  assert (
    summary['runs']['gated']['per_seed']['0']['wall_time_s']
    == (workdir_lib.read_results(joint)['wall_time_s'])
  )
  differences = summary['gated_minus_control']['per_seed']
  for seed, d in zip((0, 1), differences):
    gated = summary['runs']['gated']['per_seed'][str(seed)]['top1_error']
    control = summary['runs']['control']['per_seed'][str(seed)]['top1_error']
    assert d == pytest.approx(gated - control)
  table = open(os.path.join(workdir, reproduce.TABLE_MD)).read()
  assert '| gated − control |' in table and '| control |' in table
  for other in ('plain', 'control'):
    low, high = summary[f'gated_minus_{other}']['ci95']
    assert (
      f'gated − {other}: 95% confidence interval of the mean [{low:+.2f}, {high:+.2f}]' in table
    )
  assert json.load(open(os.path.join(workdir, reproduce.RESULTS_JSON))) == summary
  assert os.path.getsize(os.path.join(workdir, reproduce.FIGURE_PNG)) > 1000


def test_a_rerun_skips_finished_runs(reproduced):
  workdir, summary = reproduced
  before = _files(workdir)
  assert reproduce.reproduce(tiny_default('gated'), workdir, [0, 1]) == summary
  assert _files(workdir) == before  # nothing trained, evaluated or written again


@pytest.mark.slow
def test_summary_only_tables_the_finished_seeds_and_trains_nothing(reproduced):
  workdir, summary = reproduced
  assert summary['unfinished_seeds'] == []
  assert reproduce.reproduce(tiny_default('gated'), workdir, [0, 1], summary_only=True) == summary
  # Seed 1's control unfinished, then seed 0's plain run too: a reproduction read midway.
  aside = [
    os.path.join(reproduce.run_dir(workdir, seed, kind), workdir_lib.RESULTS_FILE)
    for seed, kind in ((1, 'control'), (0, 'plain'))
  ]
  os.rename(aside[0], aside[0] + '.aside')
  try:
    before = _files(workdir)
    command = [
      sys.executable, '-m', 'gaternet_jax.main', 'reproduce', '--config', 'experiments/default.py',
      '--seeds', '0,1', '--workdir', workdir, '--summary_only', *TINY_FLAGS,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'Not finished yet, left out of this table: seed 1.' in result.stdout
    assert _files(workdir) == before  # nothing trained or scored
    partial = json.load(open(os.path.join(workdir, reproduce.RESULTS_JSON)))
    assert partial['seeds'] == [0] and partial['unfinished_seeds'] == [1]
    for kind in reproduce.RUNS:
      assert partial['runs'][kind]['per_seed'] == {'0': summary['runs'][kind]['per_seed']['0']}
    assert 'ci95' not in partial['gated_minus_control']  # one seed: no interval
    os.rename(aside[1], aside[1] + '.aside')
    with pytest.raises(UserError, match='no seed of 0,1 has its plain, gated and control runs'):
      reproduce.reproduce(tiny_default('gated'), workdir, [0, 1], summary_only=True)
    expected = dict(before)
    expected[aside[1] + '.aside'] = expected.pop(aside[1])
    assert _files(workdir) == expected
  finally:
    for path in aside:
      if os.path.exists(path + '.aside'):
        os.rename(path + '.aside', path)
  # The whole table again, for the tests after this one.
  assert reproduce.reproduce(tiny_default('gated'), workdir, [0, 1]) == summary


# Another value for every field of the sections only gated runs read (checkpoints.GATE_SECTIONS).
OTHER_GATE_FIELDS = {
  'gater.bottleneck': 4,
  'gater.dropout_rate': 0.5,
  'gater.extractor': 'cifar_resnet20',
  'gater.extractor_width': 0.5,
  'gater.init_bias': 3.0,
  'gating.batch_shaping_end': 0.5,
  'gating.batch_shaping_reduction': 'mean',
  'gating.batch_shaping_weight': 2.0,
  'gating.binarizer': 'gumbel',
  'gating.l0_ramp_end': 0.9,
  'gating.l0_start': 0.1,
  'gating.l0_weight': 0.3,
  'gating.l1_weight': 0.25,
  'gating.losses': 'l1,l0,batch_shaping',
  'gating.method': 'local',
  'gating.module_hidden': 8,
  'gating.module_init_bias': 2.0,
  'gating.module_weight_decay': True,
  'gating.prior_a': 0.3,
  'gating.prior_b': 0.7,
  'gating.temperature': 1.5,
}


def test_other_gate_fields_cover_both_sections():
  flat = configs.flatten(tiny_default('plain'))
  assert sorted(OTHER_GATE_FIELDS) == sorted(
    k for k in flat if k.startswith(checkpoints.GATE_SECTIONS)
  )
  assert all(flat[k] != v for k, v in OTHER_GATE_FIELDS.items())


@pytest.mark.slow
def test_a_plain_run_trains_the_same_whatever_the_gate_sections_hold(tmp_path):
  # Why a finished plain run is kept when only these fields change (the next test).
  params = []
  for name, overrides in (('a', {}), ('b', OTHER_GATE_FIELDS)):
    directory = str(tmp_path / name)
    procedure.train_and_evaluate(tiny_default('plain', **overrides), directory)
    params.append(restore.load_state(directory).state.params)
  assert jax.tree.structure(params[0]) == jax.tree.structure(params[1])
  assert jax.tree.all(jax.tree.map(np.array_equal, *params))


def test_a_later_lambda_keeps_the_plain_runs_and_refuses_the_finished_gated_ones(reproduced):
  workdir, _ = reproduced
  before = _files(workdir)
  other = tiny_default('gated', **{'gating.l1_weight': 0.25})
  for seed, config in reproduce.plan(other, workdir, [0, 1])['plain']:
    checkpoints.check_resume_config(config, reproduce.run_dir(workdir, seed, 'plain'))
  with pytest.raises(UserError, match=r'seed0/gated.*gating\.l1_weight'):
    reproduce.reproduce(other, workdir, [0, 1])
  assert _files(workdir) == before


def test_the_paired_difference_and_its_confidence_interval():
  # t(0.975, 2 degrees of freedom) = 4.302653 (tables); the half-width is t * std / sqrt(3).
  d = reproduce.paired_difference([-1.0, -2.0, -3.0])
  assert d['mean'] == -2.0 and d['std'] == 1.0
  assert d['ci95'] == pytest.approx([-2 - 4.302653 / 3**0.5, -2 + 4.302653 / 3**0.5], abs=1e-6)
  assert d['verdict'] == 'unresolved'
  assert reproduce.paired_difference([-1.0, -1.1, -0.9])['verdict'] == 'lower'
  assert reproduce.paired_difference([0.4, 0.6])['verdict'] == 'unresolved'  # t(1) = 12.7
  assert reproduce.paired_difference([0.5, 0.6, 0.55])['verdict'] == 'higher'
  assert 'ci95' not in reproduce.paired_difference([0.5])  # one seed: no interval


def test_bad_arguments_are_one_line():
  for text in ('', '0,0', '-1', 'a,b'):
    with pytest.raises(UserError, match='--seeds'):
      reproduce.parse_seeds(text)
  with pytest.raises(UserError, match='gated config'):
    reproduce.plan(tiny_default('plain'), '/tmp/x', [0])
  with pytest.raises(UserError, match='init.backbone'):
    reproduce.plan(tiny_default('gated', **{'init.backbone': '/tmp/x'}), '/tmp/x', [0])
  with pytest.raises(UserError, match='--epochs'):
    reproduce.plan(tiny_default('gated'), '/tmp/x', [0], epochs=0)


@pytest.mark.slow
def test_vectorized_seeds_train_what_each_run_trains_alone(reproduced, tmp_path):
  workdir, summary = reproduced
  together = str(tmp_path / 'together')
  vectorized = reproduce.reproduce(tiny_default('gated'), together, [0, 1], vectorize=True)
  for kind in reproduce.RUNS:
    assert vectorized['runs'][kind]['top1_error'] == summary['runs'][kind]['top1_error'], kind
    for seed in (0, 1):
      alone = restore.load_state(reproduce.run_dir(workdir, seed, kind)).state
      member = restore.load_state(reproduce.run_dir(together, seed, kind)).state
      for a, b in ((alone.params, member.params), (alone.batch_stats, member.batch_stats)):
        leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        assert all(np.array_equal(x, y) for x, y in leaves), (kind, seed)
  # Each kind was one population (the gated one only its joint stage: its stages 1 and 2 are the
  # plain runs), and a rerun trains and writes nothing.
  populations = sorted(os.listdir(os.path.join(together, 'population')))
  assert populations == ['control', 'run', workdir_lib.STAGE_JOINT]
  before = _files(together)
  assert reproduce.reproduce(tiny_default('gated'), together, [0, 1], vectorize=True) == vectorized
  assert _files(together) == before


def test_one_seed_trains_its_own_gater_stage(tmp_path):
  runs = reproduce.plan(tiny_default('gated'), str(tmp_path), [3], epochs=2)
  ((seed, gated),) = runs['gated']
  assert seed == 3 and gated.init.gater is None and gated.schedule.num_epochs == 2.0


def test_runs_train_seed_by_seed_each_after_the_plain_runs_it_starts_from(tmp_path):
  workdir = str(tmp_path)
  runs = reproduce.plan(tiny_default('gated'), workdir, [0, 1, 2])
  assert reproduce.training_order(runs, workdir) == [
    ('plain', 0), ('plain', 1), ('gated', 0), ('control', 0),
    ('plain', 2), ('gated', 1), ('control', 1),
    ('gated', 2), ('control', 2),
  ]  # fmt: skip
  # One seed: its gated run trains its own stage 2, so only its plain run comes first.
  one = reproduce.plan(tiny_default('gated'), workdir, [5])
  assert reproduce.training_order(one, workdir) == [('plain', 5), ('gated', 5), ('control', 5)]


@pytest.mark.slow
def test_killed_reproduce_resumes_to_the_same_table(reproduced, tmp_path):
  _, summary = reproduced
  workdir = str(tmp_path / 'r')
  command = [
    sys.executable, '-m', 'gaternet_jax.main', 'reproduce', '--config', 'experiments/default.py',
    '--seeds', '0,1', '--workdir', workdir, *TINY_FLAGS,
  ]  # fmt: skip
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  # Stop it once the first gated run has begun (the plain runs are done by then).
  target = os.path.join(reproduce.run_dir(workdir, 0, 'gated'), 'config.json')
  deadline = time.time() + 600
  while not os.path.exists(target) and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=300)
  assert process.returncode in (0, 143), err.decode()[-2000:]
  assert not os.path.exists(os.path.join(workdir, reproduce.RESULTS_JSON))
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-2000:]
  assert '| gated − plain |' in again.stdout
  resumed = json.load(open(os.path.join(workdir, reproduce.RESULTS_JSON)))
  for kind in reproduce.RUNS:
    for seed in ('0', '1'):
      assert (
        resumed['runs'][kind]['per_seed'][seed]['top1_error']
        == summary['runs'][kind]['per_seed'][seed]['top1_error']
      )
