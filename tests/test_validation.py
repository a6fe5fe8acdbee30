"""validate_config / validate_workdir: shipped configs pass, each bad value is one named error."""

import glob
import os
import subprocess
import sys

import ml_collections
import pytest
from conftest import REPO, load_experiment

from gaternet_jax import configs
from gaternet_jax.errors import UserError
from gaternet_jax.validation import RULES, validate_config, validate_workdir

EXPERIMENTS = sorted(
  os.path.splitext(os.path.basename(path))[0]
  for path in glob.glob(os.path.join(REPO, 'experiments', '*.py'))
)


def with_value(field: str, value, variant: str = 'gated'):
  """The default config with `field` set to `value`, past ConfigDict's own type check."""
  config = load_experiment('default', variant).to_dict()
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(config, type_safe=False)


def refused(config) -> str:
  with pytest.raises(UserError) as e:
    validate_config(config)
  message = str(e.value)
  assert '\n' not in message
  return message


@pytest.mark.parametrize('variant', configs.VARIANTS)
@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_experiment_config_validates(name, variant):
  try:
    config = load_experiment(name, variant)
  except UserError as e:
    # Table 2 and Inception-v4 have plain and gated rows only; the _bas configs bas,
    # gaternet_bas and plain.
    assert 'variant' in str(e) and variant != 'plain'
    assert name.endswith('_bas') or variant != 'gated'
    return
  validate_config(config)


@pytest.mark.parametrize('devices', [8, 16, 32, 64, 128])
@pytest.mark.parametrize('name', [n for n in EXPERIMENTS if n != 'default'])
def test_eval_batches_divide_every_pod_slice(name, devices):
  # steps.build refuses batches that are not multiples of the device count; an eval batch of
  # 1000 (ImageNet) or 500 (CIFAR) stopped every launch on 16 or more devices (v4-32, v5e-64).
  # The training batch is the recipe's: a power of two, too small for the largest slices only
  # (DenseNet-BC's 64).
  config = load_experiment(name, 'plain' if not name.endswith('_bas') else 'bas')
  assert config.batch_size % devices == 0 or config.batch_size < devices
  assert config.eval_batch_size % devices == 0


def test_rules_cover_every_field_of_the_base_config():
  # A new config field without a rule would go unchecked: the table must grow with the config.
  def leaves(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from leaves(v, f'{prefix}{k}.')
      else:
        yield f'{prefix}{k}'

  assert set(leaves(load_experiment('default').to_dict())) == set(RULES)


@pytest.mark.parametrize(
  'field, value',
  [
    ('optimizer.learning_rate', -1.0),
    ('optimizer.learning_rate', 0.0),
    ('gating.l1_weight', -1.0),
    ('gater.dropout_rate', 2.0),
    ('gater.dropout_rate', 1.0),
    ('model.width', 0.0),
    ('schedule.num_epochs', 0.0),
    ('max_steps', 0),
    ('gater.bottleneck', 0),
    ('gater.bottleneck', -8),
    ('seed', -1),
    ('batch_size', 0),
    ('eval_batch_size', 0),
    ('log_every_steps', 0),
    ('checkpoint_every_steps', 0),
    ('checkpoint_min_interval_s', -1.0),
    ('checkpoint_min_interval_s', float('nan')),
    ('keep_checkpoints', 0),
    ('optimizer.base_batch_size', 0),
    ('optimizer.momentum', 1.0),
    ('optimizer.momentum', -0.1),
    ('optimizer.weight_decay', -1e-4),
    ('schedule.name', 'linear'),
    ('schedule.warmup_epochs', -1.0),
    ('schedule.warmup_epochs', 15.0),  # == num_epochs of the default config
    ('schedule.boundaries', (0.75, 0.5)),
    ('schedule.boundaries', (0.5, 0.5)),
    ('schedule.boundaries', (0.0, 0.5)),
    ('schedule.boundaries', (0.5, 1.0)),
    ('schedule.boundaries', ('half',)),
    ('schedule.decay_factor', 0.0),
    ('schedule.decay_factor', 1.5),
    ('eval_every_epochs', 0.0),
    ('model.se_reduction', -1),
    ('model.backbone', 'resnet7'),
    ('gater.extractor', 'resnet7'),
    ('gater.extractor_width', 0.0),
    ('gater.init_bias', float('inf')),
    ('data.name', 'mnist'),
    ('data.holdout', -1),
    ('data.image_size', 0),
    ('data.shuffle_buffer', 0),
    ('data.crop_padding', -1),
    ('procedure.pretrain_epochs', 0.0),
    ('procedure.joint_extra_epochs', -1.0),
    ('procedure.joint_learning_rate', -0.1),
    ('optimizer.learning_rate', float('nan')),
    ('model.width', float('inf')),
  ],
)
def test_bad_value_is_refused_naming_the_field(field, value):
  message = refused(with_value(field, value))
  assert f'config field {field} ' in message
  assert message.count('config field') == 1  # one mistake, one message


def test_message_says_what_is_allowed():
  message = refused(with_value('optimizer.learning_rate', -1.0))
  assert message == 'config field optimizer.learning_rate must be > 0, got -1.0'


def test_unknown_backbone_message_lists_the_registered_names():
  message = refused(with_value('model.backbone', 'resnet7'))
  assert 'cifar_resnet20' in message and 'resnet50' in message


def test_override_of_a_locked_config_is_refused():
  # The path the CLI takes: an override that ConfigDict's own type check lets through.
  config = load_experiment('default')
  config.lock()
  config.gater.bottleneck = 0
  assert 'gater.bottleneck must be >= 1, got 0' in refused(config)


@pytest.mark.parametrize(
  'field', ['batch_size', 'seed', 'optimizer.learning_rate', 'model.backbone', 'half_precision']
)
def test_none_is_refused_where_the_config_does_not_document_it(field):
  assert f'config field {field} ' in refused(with_value(field, None))


@pytest.mark.parametrize(
  'field',
  [
    'max_steps',
    'data.data_dir',
    'procedure.pretrain_epochs',
    'procedure.joint_learning_rate',
    'init.backbone',
    'init.gater',
  ],
)
def test_none_is_allowed_where_documented(field):
  validate_config(with_value(field, None))


@pytest.mark.parametrize(
  'field, value',
  [
    ('batch_size', '128'),
    ('batch_size', 128.0),
    ('batch_size', True),  # a bool is no int here
    ('gater.bottleneck', 8.5),
    ('optimizer.learning_rate', '0.1'),
    ('optimizer.learning_rate', True),
    ('model.backbone', 20),
    ('half_precision', 1),
    ('procedure.pretrain', 'yes'),
    ('schedule.boundaries', 0.5),
  ],
)
def test_wrong_type_is_refused(field, value):
  assert f'config field {field} must be ' in refused(with_value(field, value))


def test_int_is_accepted_for_a_float_field():
  validate_config(with_value('optimizer.learning_rate', 1))
  validate_config(with_value('schedule.boundaries', [0.25, 0.5]))  # a list, as from config.json


def test_every_problem_is_reported_on_one_line():
  config = with_value('optimizer.learning_rate', -1.0)
  config.max_steps = 0
  message = refused(config)
  assert 'optimizer.learning_rate' in message and 'max_steps' in message


def test_missing_and_extra_fields_are_fine():
  config = load_experiment('default').to_dict()
  del config['max_steps'], config['gater']['dropout_rate'], config['procedure']
  config['future_field'] = 'x'
  config['model']['future_knob'] = -1
  validate_config(config)  # a plain dict (config.json) works too
  validate_config(ml_collections.ConfigDict(config))


def test_relation_is_skipped_when_a_side_is_missing():
  config = load_experiment('default').to_dict()
  del config['schedule']['num_epochs']
  config['schedule']['warmup_epochs'] = 1000.0
  validate_config(config)


@pytest.mark.parametrize('workdir', ['', '   ', '\t\n'])
def test_empty_workdir_is_refused(workdir):
  with pytest.raises(UserError, match='--workdir must not be empty'):
    validate_workdir(workdir)


def test_workdir_is_accepted():
  validate_workdir('runs/default')


@pytest.mark.slow
def test_importing_the_module_imports_no_jax():
  code = 'import sys, gaternet_jax.validation; assert "jax" not in sys.modules, "jax imported"'
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
