"""The Python API (`gaternet_jax.load_run`) and the command line's help and config listing."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO

import gaternet_jax
from gaternet_jax import analysis, usage
from gaternet_jax.data import embedded
from gaternet_jax.errors import UserError
from gaternet_jax.training import restore
from gaternet_jax.training import workdir as workdir_lib


@pytest.mark.slow
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


def test_predict_refuses_images_of_another_shape_or_dtype(gated_run):
  run = restore.load_run(gated_run[0])
  with pytest.raises(UserError, match='shape'):
    run.predict(np.zeros((2, 8, 8, 1), np.uint8))
  images = embedded.load_arrays()['test'][0][:4]
  # Floats in [0, 1] used to be cast to uint8 (all black), wide ints wrapped, NaN became 0.
  for wrong in (
    images.astype('float32') / 255,
    images.astype('int64') + 256,
    np.full_like(images, np.nan, dtype='float64'),
  ):
    with pytest.raises(UserError, match='predict takes uint8 images') as refused:
      run.predict(wrong)
    assert '\n' not in str(refused.value) and str(wrong.dtype) in str(refused.value)


def test_load_run_takes_any_path_like(gated_run):
  import pathlib  # noqa: PLC0415

  from etils import epath  # noqa: PLC0415

  for path in (pathlib.Path(gated_run[0]), epath.Path(gated_run[0])):
    assert gaternet_jax.load_run(path).gated
  with pytest.raises(UserError, match='a workdir is a path'):
    gaternet_jax.load_run(3)


def test_reading_a_run_whose_checkpoint_is_removed_meanwhile(gated_run, tmp_path, monkeypatch):
  """A run that trains removes its oldest checkpoint after each save: evaluate, export and
  load_run, which list the checkpoints first and read one after, must not fail when the one they
  listed is gone (it used to be 'checkpoint N is unreadable'), and must say it plainly when that
  exact step was asked for."""
  import shutil  # noqa: PLC0415

  from gaternet_jax.training import checkpoints  # noqa: PLC0415

  stage = str(tmp_path / 'run')
  shutil.copytree(workdir_lib.join(gated_run[0], workdir_lib.STAGE_JOINT), stage)
  original = checkpoints.restore

  def training_meanwhile(manager, step, *args, **kwargs):
    # The "training run" saves step + 3 and removes `step` between listing and reading.
    if step == 6:
      root = os.path.join(stage, 'checkpoints')
      shutil.copytree(os.path.join(root, '6'), os.path.join(root, '9'))
      digests = json.load(open(os.path.join(stage, 'checksums.json')))
      digests['9'] = digests['6']
      json.dump(digests, open(os.path.join(stage, 'checksums.json'), 'w'))
      shutil.rmtree(os.path.join(root, '6'))
    return original(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints, 'restore', training_meanwhile)
  assert restore.load_state(stage).step == 9
  monkeypatch.setattr(checkpoints, 'restore', original)
  os.rename(os.path.join(stage, 'checkpoints', '9'), os.path.join(stage, 'checkpoints', '6'))
  monkeypatch.setattr(checkpoints, 'restore', training_meanwhile)
  with pytest.raises(UserError, match='checkpoint 6 .* was removed while it was read'):
    restore.load_state(stage, step=6)


@pytest.mark.slow
@pytest.mark.parametrize('command', usage.COMMANDS)
def test_each_command_lists_its_own_flags(cli, command):
  result = cli(command, '--help')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith(f'usage: gaternet {command}')
  flags = [l.split()[0] for l in result.stdout.splitlines() if l.startswith('  --')]
  assert '--distributed' in flags and len(flags) == len(set(flags))
  assert ('--workdir' in flags) == (command not in ('describe', 'compile'))
  # Spelled as absl and flax spell them: underscores (the hyphenated ones are hidden aliases).
  assert not [f for f in flags if '-' in f[2:]], flags
  assert not re.search(r'--[a-z]+-[a-z]', result.stdout.split('flags:')[0])
  if command in ('train', 'describe', 'sweep', 'reproduce', 'compile'):
    assert '--show_config' in result.stdout  # how to see the config's fields


@pytest.mark.slow
def test_the_command_line_starts_without_matplotlib_or_scipy_stats():
  """Every `gaternet` command imports the CLI; the figures (matplotlib) and the reproduction's
  confidence interval (scipy.stats) take about 1.5 s to import, so they load where they are used.
  The figure names stay reachable from the analysis package."""
  code = textwrap.dedent("""
      import sys
      import gaternet_jax.cli
      print(sorted(m for m in ('matplotlib', 'scipy.stats', 'sklearn') if m in sys.modules))
      from gaternet_jax import analysis
      assert {'figures', 'census_figure', 'analyze'} <= set(dir(analysis))
      assert 'matplotlib' not in sys.modules
      from gaternet_jax.analysis import census_figure, figures
      assert census_figure is figures.census_figure is analysis.census_figure
      assert 'matplotlib' in sys.modules
      try:
        analysis.no_such_name
      except AttributeError as e:
        assert 'no_such_name' in str(e)
      else:
        raise AssertionError('no AttributeError')
  """)
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == '[]', result.stdout


@pytest.mark.slow
def test_gaternet_help_names_every_command_and_helpfull_is_absls(cli):
  overview = cli('--help')
  assert overview.returncode == 0
  for command in usage.COMMANDS:
    assert f'  {command} ' in overview.stdout and usage.USAGE[command] in overview.stdout
  full = cli('evaluate', '--helpfull')
  assert full.returncode == 0 and '--gate_threshold' in full.stdout + full.stderr
  assert 'absl' in (full.stdout + full.stderr)  # absl's own flags too


@pytest.mark.slow
def test_report_takes_workdir_flags_and_the_hyphenated_spellings_still_work(gated_run, cli):
  workdir, _ = gated_run
  table = cli('report', '--workdir', workdir)
  assert table.returncode == 0 and table.stdout.startswith('|'), table.stderr[-2000:]
  assert cli('report', workdir).stdout == table.stdout
  old = cli('evaluate', '--workdir', workdir, '--gate-threshold=0.5', '--skip-off-units', '--json')
  new = cli('evaluate', '--workdir', workdir, '--gate_threshold=0.5', '--skip_off_units', '--json')
  assert old.returncode == 0 and json.loads(old.stdout) == json.loads(new.stdout)


@pytest.mark.slow
def test_describe_show_config_lists_every_field(cli):
  result = cli('describe', '--config', 'experiments/cifar10_resnet20.py:gated', '--show_config')
  assert result.returncode == 0, result.stderr[-2000:]
  for field in ('l1_weight:', 'learning_rate:', 'num_epochs:', 'holdout:', 'joint_extra_epochs:'):
    assert field in result.stdout


def test_command_errors_name_the_commands_own_flags(gated_run):
  from gaternet_jax.analysis import collect  # noqa: PLC0415
  from gaternet_jax.commands import evaluate  # noqa: PLC0415

  with pytest.raises(UserError, match=r'set --split to one of them'):
    evaluate.evaluate_workdir(gated_run[0], split='nope')
  with pytest.raises(UserError, match='--max_embed_examples must be at least 0'):
    collect.analyze_workdir(gated_run[0], max_embed_examples=-1)
