"""The paper's procedure: three resumable stages, initialisation from pre-trained runs."""

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
from gaternet_jax import data as data_lib
from gaternet_jax.errors import CheckpointError
from gaternet_jax.training import procedure, restore, steps
from gaternet_jax.training import workdir as workdir_lib


def test_three_stages_and_results(gated_run):
  workdir, results = gated_run
  for stage in (workdir_lib.STAGE_BACKBONE, workdir_lib.STAGE_GATER, workdir_lib.STAGE_JOINT):
    assert os.path.exists(os.path.join(workdir, stage, 'results.json')), stage
  assert (
    configs.variant_of(workdir_lib.load_config(os.path.join(workdir, workdir_lib.STAGE_BACKBONE)))
    == 'plain'
  )
  gater_config = workdir_lib.load_config(os.path.join(workdir, workdir_lib.STAGE_GATER))
  assert gater_config.model.backbone == 'cifar_resnet8' and not gater_config.model.gated
  assert results['stage'] == workdir_lib.STAGE_JOINT and results['gated_filters'] == 112
  assert 0.0 <= results['eval']['gate_density'] <= 1.0
  top = json.load(open(os.path.join(workdir, 'results.json')))
  assert top['stages'][workdir_lib.STAGE_JOINT].endswith(workdir_lib.STAGE_JOINT)


def test_joint_stage_starts_from_pretrained_parameters(gated_run):
  """At step 0, the backbone equals stage 1's and the extractor stage 2's (exactly)."""
  workdir, _ = gated_run
  config = tiny_default('gated')
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  fresh = steps.create_state(setup, 123)
  backbone_dir = os.path.join(workdir, workdir_lib.STAGE_BACKBONE)
  gater_dir = os.path.join(workdir, workdir_lib.STAGE_GATER)
  state = procedure.init_from_pretrained(fresh, setup, backbone_dir, gater_dir)
  stage1 = restore.load_state(backbone_dir).state
  stage2 = restore.load_state(gater_dir).state
  same = lambda a, b: all(
    np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)  # noqa: E731
  )
  assert same(state.params['backbone'], stage1.params['backbone'])
  assert same(state.batch_stats['backbone'], stage1.batch_stats['backbone'])
  extractor = {k: v for k, v in stage2.params['backbone'].items() if k != 'head'}
  assert same(state.params['gater']['extractor'], extractor)
  assert same(state.batch_stats['gater']['extractor'], stage2.batch_stats['backbone'])
  # The gater's FC layers are fresh: what a new GaterNet starts with.
  for name in ('fc1', 'fc2', 'bn'):
    assert same(state.params['gater'][name], fresh.params['gater'][name])
  assert int(state.step) == 0
  # And stage 1 and stage 2 differ (different seeds), so the check above is not vacuous.
  assert not same(stage1.params['backbone'], stage2.params['backbone'])


def test_mismatched_pretrained_architecture_names_the_parameter(gated_run):
  workdir, _ = gated_run
  config = tiny_default('gated')
  config.model.width = 0.5
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  with pytest.raises(CheckpointError, match=r'parameter backbone/\S+ has shape'):
    procedure.init_from_pretrained(
      steps.create_state(setup, 0),
      setup,
      os.path.join(workdir, workdir_lib.STAGE_BACKBONE),
      os.path.join(workdir, workdir_lib.STAGE_GATER),
    )


@pytest.mark.slow
def test_init_fields_skip_pretraining_stages(gated_run, tmp_path, cli):
  workdir, _ = gated_run
  out = tmp_path / 'reuse'
  result = cli(
    'train',
    '--config',
    'experiments/default.py',
    '--workdir',
    str(out),
    *TINY_FLAGS,
    f'--config.init.backbone={workdir}',
    f'--config.init.gater={workdir}',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert (
    not (out / workdir_lib.STAGE_BACKBONE).exists() and not (out / workdir_lib.STAGE_GATER).exists()
  )
  assert (out / workdir_lib.STAGE_JOINT / 'results.json').exists()
  bad = cli(
    'train',
    '--config',
    'experiments/default.py',
    '--workdir',
    str(tmp_path / 'bad'),
    *TINY_FLAGS,
    f'--config.init.backbone={tmp_path / "missing"}',
  )
  assert bad.returncode == 2 and 'holds no checkpoint' in bad.stderr


@pytest.mark.slow
def test_killed_during_joint_stage_does_not_rerun_pretraining(tmp_path, cli):
  workdir = tmp_path / 'proc'
  flags = [
    '--config',
    'experiments/default.py',
    '--workdir',
    str(workdir),
    '--config.max_steps=40',
    '--config.checkpoint_every_steps=5',
    '--config.log_every_steps=5',
    '--config.eval_every_epochs=100',
  ]
  joint_ckpt = workdir / workdir_lib.STAGE_JOINT / 'checkpoints'
  proc = subprocess.Popen(
    [sys.executable, '-m', 'gaternet_jax.main', 'train', *flags],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.time() + 400
    while time.time() < deadline and not (
      joint_ckpt.is_dir() and any(d.isdigit() for d in os.listdir(joint_ckpt))
    ):
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert any(d.isdigit() for d in os.listdir(joint_ckpt)), 'joint stage never checkpointed'
  assert not (workdir / workdir_lib.STAGE_JOINT / 'results.json').exists()
  pretrained = {
    s: os.path.getmtime(workdir / s / 'results.json')
    for s in (workdir_lib.STAGE_BACKBONE, workdir_lib.STAGE_GATER)
  }
  result = cli('train', *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  for stage, mtime in pretrained.items():
    assert os.path.getmtime(workdir / stage / 'results.json') == mtime, stage
  assert 'stage1_backbone: ' not in result.stderr and 'stage2_gater: ' not in result.stderr
  assert f'Resumed {workdir / workdir_lib.STAGE_JOINT}' in result.stderr
  final = json.loads(result.stdout.strip().splitlines()[-1])
  assert final['step'] == 40 and final['stage'] == workdir_lib.STAGE_JOINT


@pytest.mark.slow
def test_init_from_a_run_on_other_data_is_refused(gated_run, tmp_path, cli):
  """A pre-trained stage from another hold-out could have seen this run's held-out images."""
  workdir, _ = gated_run
  out = tmp_path / 'leak'
  result = cli(
    'train', '--config', 'experiments/default.py', '--workdir', str(out), *TINY_FLAGS,
    f'--config.init.backbone={workdir}', '--config.data.holdout=100',
    '--config.data.eval_split=holdout',
  )  # fmt: skip
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert 'other data' in errors[0] and 'data.holdout' in errors[0]
  assert not out.exists()  # nothing written


def test_procedure_wall_time_is_the_sum_of_its_stages(gated_run):
  """Each stage's wall time counts all of its resumed pieces; the procedure's is their sum."""
  workdir, results = gated_run
  stages = [workdir_lib.read_results(workdir_lib.join(workdir, s)) for s in workdir_lib.STAGES]
  total = sum(stage['wall_time_s'] for stage in stages)
  assert abs(results['procedure_wall_time_s'] - total) < 0.05
  assert all(stage['wall_time_s'] > 0 for stage in stages)
