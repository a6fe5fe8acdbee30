"""Renamed config fields: old runs' config.json read with the new names, old spellings told the new.

`gater.l1_weight` became `gating.l1_weight` on 2026-12-05 (legacy.RENAMED_FIELDS), and `variant`
is derived from the model instead of stored (legacy.DROPPED_FIELDS).
"""

import glob
import json
import os

import ml_collections
import pytest
from conftest import REPO, TINY_FLAGS, load_experiment, tiny_default

from gaternet_jax import configs, legacy
from gaternet_jax.commands import evaluate
from gaternet_jax.errors import UserError
from gaternet_jax.training import checkpoints, procedure, restore

EXPERIMENTS = sorted(
  os.path.splitext(os.path.basename(p))[0]
  for p in glob.glob(os.path.join(REPO, 'experiments', '*.py'))
)


def test_a_stored_config_is_read_with_the_new_names():
  stored = {'gater': {'l1_weight': 0.37, 'bottleneck': 16}, 'gating': {'method': 'gaternet'}}
  read = legacy.read_stored(stored)
  assert read['gating']['l1_weight'] == 0.37 and 'l1_weight' not in read['gater']
  assert read['gater']['bottleneck'] == 16 and read['gating']['method'] == 'gaternet'


def test_a_config_saved_before_the_gating_section_gets_gaternets_with_its_lambda():
  read = legacy.read_stored({'gater': {'l1_weight': 0.37}, 'model': {'gated': True}})
  recipe = configs.gating_config('gated').to_dict()
  # What `configs.gating_of` read such a run as before the rename, with its own lambda.
  assert read['gating'] == {**recipe, 'l1_weight': 0.37}


def _to_old_names(workdir: str) -> None:
  """Makes `workdir`'s config.json look like one saved before the rename."""
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    stored = json.load(f)
  stored['gater']['l1_weight'] = stored['gating'].pop('l1_weight')
  with open(path, 'w') as f:
    json.dump(stored, f)


@pytest.mark.slow
def test_a_run_saved_with_the_old_name_keeps_its_lambda_and_resumes(tmp_path):
  workdir = str(tmp_path / 'old')
  config = tiny_default('gated', **{'procedure.pretrain': False, 'gating.l1_weight': 0.37})
  trained = procedure.train_and_evaluate(config, workdir)
  before = evaluate.evaluate_workdir(workdir)
  _to_old_names(workdir)
  assert restore.load_state(workdir).config.gating.l1_weight == 0.37
  assert evaluate.evaluate_workdir(workdir) == before
  # Today's config with the same lambda is the same run: it resumes, to the same numbers.
  assert checkpoints.keep_stored_recipe(config, workdir).gating.l1_weight == 0.37
  resumed = procedure.train_and_evaluate(config, workdir, resume_step=3)
  assert resumed['step'] == trained['step']
  assert resumed['eval']['loss'] == pytest.approx(trained['eval']['loss'], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('command', ['train', 'sweep'])
def test_the_old_spelling_is_one_error_naming_the_new(tmp_path, cli, command):
  args = ['--config', 'experiments/default.py', '--workdir', str(tmp_path / 'w'), *TINY_FLAGS]
  if command == 'train':
    args.append('--config.gater.l1_weight=0.5')
  else:
    args += ['--sweep', 'gater.l1_weight=0.5,1']
  result = cli(command, *args)
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert 'gater.l1_weight' in errors[0] and 'renamed gating.l1_weight' in errors[0]
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('experiment', EXPERIMENTS)
def test_the_variant_is_derived_from_the_model_for_every_experiment(experiment):
  """`variant` is not a field: the config string's variant is what the model fields say."""
  for variant in configs.VARIANTS:
    try:
      config = load_experiment(experiment, variant)
    except UserError:  # not every experiment has every variant
      continue
    assert 'variant' not in config and configs.variant_of(config) == variant


def test_a_stored_variant_is_dropped_and_the_model_decides():
  stored = {'variant': 'gated', 'model': {'gated': False, 'width': 1.0, 'se_reduction': 0}}
  read = legacy.read_stored(stored)
  assert 'variant' not in read and configs.variant_of(ml_collections.ConfigDict(read)) == 'plain'
