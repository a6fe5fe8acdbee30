"""The Python API (`gaternet_jax.load_run`) and the command line's help and config listing."""

import json

import numpy as np
import pytest

import gaternet_jax
from gaternet_jax import analysis, restore
from gaternet_jax import workdir as workdir_lib
from gaternet_jax.data import embedded
from gaternet_jax.errors import UserError


def test_load_run_predict_matches_evaluate_and_analyze(gated_run, tmp_path, cli):
  """predict() on the embedded test images: evaluate's top-1 error and analyze's gates."""
  workdir, _ = gated_run
  run = gaternet_jax.load_run(workdir)
  assert run.workdir.endswith(workdir_lib.STAGE_JOINT)  # a procedure workdir loads its joint stage
  assert run.image_shape == embedded.IMAGE_SHAPE and run.gated and run.step == 6
  assert set(run.variables) == {'params', 'batch_stats'}
  images, labels = embedded.load_arrays()['test']
  logits, gates = run.predict(images)
  assert logits.shape == (len(images), 10) and gates.shape == (len(images), run.num_gates)
  error = 100.0 * np.mean(np.argmax(logits, -1) != labels)

  evaluated = cli('evaluate', '--workdir', workdir, '--json')
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  np.testing.assert_allclose(error, json.loads(evaluated.stdout)['top1_error'], atol=1e-6)

  out = tmp_path / 'analysis'
  analyzed = cli('analyze', '--workdir', workdir, '--out', str(out), '--max-embed-examples', '0')
  assert analyzed.returncode == 0, analyzed.stderr[-2000:]
  stored_gates, stored_labels, _ = analysis.load_gates(out / 'gates.npz')
  np.testing.assert_array_equal(gates, stored_gates)
  np.testing.assert_array_equal(labels, stored_labels)
  # Batched internally: any n, the same answer as one pass.
  some_logits, some_gates = run.predict(images[:7])
  np.testing.assert_allclose(some_logits, logits[:7], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(some_gates, gates[:7])
  empty_logits, empty_gates = run.predict(images[:0])
  assert empty_logits.shape == (0, 10) and empty_gates.shape == (0, run.num_gates)


def test_load_run_of_a_stage_and_of_a_plain_model(gated_run):
  workdir, _ = gated_run
  stage = gaternet_jax.load_run(workdir_lib.join(workdir, workdir_lib.STAGE_BACKBONE))
  images, _ = embedded.load_arrays()['test']
  logits, gates = stage.predict(images[:5])
  assert logits.shape == (5, 10) and gates is None and not stage.gated
  with pytest.raises(UserError, match='needs a GaterNet'):  # a plain model has no units to skip
    gaternet_jax.load_run(
      workdir_lib.join(workdir, workdir_lib.STAGE_BACKBONE), skip_off_units=True
    )


def test_load_run_errors_are_one_line(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    gaternet_jax.load_run(str(tmp_path / 'missing'))
  with pytest.raises(UserError, match='no checkpoint'):
    gaternet_jax.load_run(str(tmp_path))
  with pytest.raises(UserError, match='batch_size must be at least 1'):
    gaternet_jax.load_run(str(tmp_path), batch_size=0)


def test_predict_refuses_images_of_another_shape(gated_run):
  run = restore.load_run(gated_run[0])
  with pytest.raises(UserError, match='shape'):
    run.predict(np.zeros((2, 8, 8, 1), np.uint8))


@pytest.mark.parametrize('command', ['train', 'evaluate', 'describe', 'analyze', 'sweep'])
def test_each_command_lists_its_own_flags(cli, command):
  result = cli(command, '--help')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith(f'usage: gaternet {command}')
  flags = [l.split()[0] for l in result.stdout.splitlines() if l.startswith('  --')]
  assert '--distributed' in flags and len(flags) == len(set(flags))
  assert ('--workdir' in flags) == (command != 'describe')
  if command in ('train', 'describe', 'sweep'):
    assert '--show_config' in result.stdout  # how to see the config's fields


def test_describe_show_config_lists_every_field(cli):
  result = cli('describe', '--config', 'experiments/cifar10_resnet20.py:gated', '--show_config')
  assert result.returncode == 0, result.stderr[-2000:]
  for field in ('l1_weight:', 'learning_rate:', 'num_epochs:', 'holdout:', 'joint_extra_epochs:'):
    assert field in result.stdout
