"""Batch-Shaping's local gating: gating modules in the units, mix-and-match gating, and every gate
consumer (describe, evaluate, analyze, tradeoff, the procedure) on a locally gated run."""

import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_experiment, perturbed, run_on_cpu_devices, tiny_default

from gaternet_jax import analysis, configs, models, validation
from gaternet_jax import data as data_lib
from gaternet_jax.analysis import collect
from gaternet_jax.commands import describe, evaluate, export, tradeoff
from gaternet_jax.errors import UserError
from gaternet_jax.gating.local import LocalGates
from gaternet_jax.models import layers
from gaternet_jax.models.gaternet import Classifier, LocallyGated
from gaternet_jax.models.resnet import BottleneckUnit, ResNet
from gaternet_jax.models.resnet_cifar import CifarResNet, PreActBottleneckUnit
from gaternet_jax.training import procedure, restore, steps
from gaternet_jax.training import workdir as workdir_lib

# Gated channels = the first convolution's filters of every unit (its mid channels).
BAS_GATED_FILTERS = {
  'cifar10_resnet20_bas': 3 * (16 + 32 + 64),
  'cifar10_resnet32_bas': 5 * (16 + 32 + 64),
  'cifar10_resnet56_bas': 9 * (16 + 32 + 64),
  'cifar10_resnet110_bas': 18 * (16 + 32 + 64),
  'imagenet_resnet18_bas': 2 * (64 + 128 + 256 + 512),
  'imagenet_resnet34_bas': 3 * 64 + 4 * 128 + 6 * 256 + 3 * 512,
  'imagenet_resnet50_bas': 3 * 64 + 4 * 128 + 6 * 256 + 3 * 512,
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(BAS_GATED_FILTERS))
def test_bas_configs_describe_their_gates_and_gating_modules(name):
  config = load_experiment(name)
  assert (configs.variant_of(config), config.gating.method, config.gating.binarizer) == (
    'bas',
    'local',
    'gumbel',
  )
  stats = describe.summary(config)
  assert stats['gated_filters'] == BAS_GATED_FILTERS[name]
  plain = describe.summary(load_experiment(name, 'plain'))
  # The gating modules are the only addition, counted as the gater's parameters and MACs.
  assert stats['backbone_params'] == plain['backbone_params']
  assert stats['backbone_macs'] == plain['backbone_macs']
  assert stats['total_params'] == plain['total_params'] + stats['gater_params']
  assert 0 < stats['gater_macs'] < stats['backbone_macs'] / 100


def test_first_conv_layout_counts_the_filter_and_the_next_convs_input():
  config = load_experiment('cifar10_resnet20_bas')
  layout = models.gate_layout(config, (32, 32, 3))
  # stage1/unit1: 3x3 conv 16 -> 16 and 3x3 conv 16 -> 16 on 32x32: per conv1 filter
  # 9*16*32*32 (the filter) + 9*16*32*32 (conv2's work on its channel).
  assert layout[0] == ('stage1/unit1', 16, 2 * 9 * 16 * 32 * 32)
  # stage2/unit1 (stride 2, 16 -> 32): the filter on 16x16 from 16 channels, conv2 32 -> 32.
  assert layout[3] == ('stage2/unit1', 32, 9 * 16 * 16 * 16 + 9 * 32 * 16 * 16)
  r50 = models.gate_layout(load_experiment('imagenet_resnet50_bas'), (224, 224, 3))
  # stage2/unit1: 1x1 conv 256 -> 128 at 56x56, then 3x3 conv (stride 2) 128 -> 128 at 28x28.
  assert r50[3] == ('stage2/unit1', 128, 256 * 56 * 56 + 9 * 128 * 28 * 28)


class FixedGates(LocalGates):
  """A LocalGates whose gates are given (no gating module): isolates how a unit applies them."""

  def __init__(self, fixed):
    super().__init__(train=False)
    self.fixed = fixed

  def gate(self, x, channels):
    assert channels == self.fixed.shape[-1]
    return self.fixed


UNITS = {
  'basic': lambda: layers.BasicUnit(8, 8, 1, 0, projection=False),
  'bottleneck': lambda: BottleneckUnit(8, 16, 1, 0, dtype=jnp.float32),
  'preact_bottleneck': lambda: PreActBottleneckUnit(8, 16, 1, 0, dtype=jnp.float32),
}


@pytest.mark.parametrize('kind', sorted(UNITS))
def test_a_zero_local_gate_zeroes_exactly_that_channel_of_that_sample(kind):
  """The second convolution sees the first one's output with exactly that channel of that
  sample zeroed, everything else unchanged."""
  unit = UNITS[kind]()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16 if kind != 'basic' else 8))
  variables = unit.init(jax.random.key(1), x, FixedGates(jnp.ones((2, 8))), train=False)
  ones = jnp.ones((2, 8))
  gates = ones.at[1, 3].set(0.0)

  def conv2_input(g):
    seen = []

    def spy(next_fun, args, kwargs, context):
      if context.module.name == 'conv2' and context.method_name == '__call__':
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
      unit.apply(variables, x, FixedGates(g), train=False)
    return np.asarray(seen[0])

  full, gated = conv2_input(ones), conv2_input(gates)
  assert np.abs(full[1, ..., 3]).max() > 0  # the channel was nonzero before
  np.testing.assert_array_equal(gated[1, ..., 3], 0.0)
  mask = np.ones_like(full, bool)
  mask[1, ..., 3] = False
  np.testing.assert_array_equal(gated[mask], full[mask])


def _build(config):
  dataset = data_lib.load_dataset(config.data)
  return dataset, steps.build(config, dataset.info)


@pytest.mark.slow
def test_locally_gated_model_gates_binary_in_training_and_deterministic_in_evaluation():
  config = tiny_default('bas')
  dataset, setup = _build(config)
  state = steps.create_state(setup, 0)
  # Every unit's gating module lives under the unit.
  units = [k for k in state.params['backbone'] if k.startswith('stage')]
  assert units and all(
    set(state.params['backbone'][u]['gate']) == {'fc1', 'bn', 'fc2'} for u in units
  )
  images, _ = dataset.train_arrays()
  x = jnp.asarray(images[:16], jnp.float32) / 255.0
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  (_, aux), _ = setup.model.apply(
    variables, x, train=True, rngs={'gates': jax.random.key(5)}, mutable=['batch_stats']
  )
  width = sum(layer.filters for layer in models.gate_layout(config, dataset.info.image_shape))
  assert aux['gates'].shape == aux['gate_logits'].shape == (16, width)
  assert set(np.unique(np.asarray(aux['gates']))) <= {0.0, 1.0}
  first = setup.model.apply(variables, x, train=False)
  second = setup.model.apply(variables, x, train=False)
  np.testing.assert_array_equal(first[1]['gates'], second[1]['gates'])
  np.testing.assert_array_equal(first[1]['gates'], np.asarray(first[1]['gate_logits']) > 0)
  # The gate threshold switches gates off monotonically.
  high = setup.model.apply(variables, x, train=False, gate_threshold=1.5)[1]['gates']
  assert np.all(np.asarray(high) <= np.asarray(first[1]['gates']))


@pytest.mark.slow
@pytest.mark.parametrize(
  'method,binarizer', [('local', 'gumbel'), ('local', 'semhash'), ('gaternet', 'gumbel')]
)
def test_every_method_and_binarizer_trains_with_every_gate_loss(method, binarizer):
  """(gaternet, semhash) with every loss is the gaternet_bas case of test_train/test_procedure's
  GaterNet runs plus these terms; here the other three pairs, all three losses active at once."""
  config = tiny_default(
    'bas',
    **{
      'gating.method': method,
      'gating.binarizer': binarizer,
      'gating.losses': 'l1,l0,batch_shaping',
      'gating.l0_start': 0.0,
      'gating.l0_ramp_end': 0.0,
      'procedure.pretrain': False,
      'schedule.warmup_epochs': 0.0,  # a nonzero learning rate at step 0
    },
  )
  dataset, setup = _build(config)
  train_step, _, _ = steps.compile_steps(setup)
  state = steps.create_state(setup, 0)
  before = jax.device_get(state.params)
  images, labels = dataset.train_arrays()
  batch = {
    'image': jnp.asarray(images[: config.batch_size]),
    'label': jnp.asarray(labels[: config.batch_size]),
  }
  state, metrics = train_step(state, batch, jax.random.key(0))
  for name in ('l1', 'l0', 'batch_shaping'):
    assert float(metrics[name]) > 0, name
  assert bool(metrics['finite'])
  after = jax.device_get(state.params)
  # The gating parameters learn: the gater's FC2 or every unit's gating module.
  if method == 'local':
    moved = after['backbone']['stage1_unit1']['gate']['fc2']['kernel']
    start = before['backbone']['stage1_unit1']['gate']['fc2']['kernel']
  else:
    moved, start = after['gater']['fc2']['kernel'], before['gater']['fc2']['kernel']
  assert not np.allclose(moved, start)


def test_bad_gating_fields_are_refused_with_one_line():
  for field, value, message in (
    ('gating.method', 'global', 'must be one of gaternet, local'),
    ('gating.binarizer', 'sign', 'must be one of semhash, gumbel'),
    ('gating.losses', 'l1,l2', 'distinct names from l1, l0, batch_shaping'),
    ('gating.l0_weight', -1.0, 'must be >= 0'),
    ('gating.batch_shaping_end', 1.5, 'must be in (0, 1]'),
    ('gating.l0_start', 0.7, 'must be <= gating.l0_ramp_end'),
  ):
    with pytest.raises(UserError, match=re.escape(message)) as e:
      validation.validate_config(tiny_default('bas', **{field: value}))
    assert '\n' not in str(e.value) and field in str(e.value)
  with pytest.raises(UserError, match='gating.method'):
    models.is_local(tiny_default('bas', **{'gating.method': 'global'}))
  config = load_experiment('cifar10_densenet_bc100_k12', 'gated')
  with config.unlocked():
    config.gating.method = 'local'
  with pytest.raises(UserError, match='cannot be gated locally'):
    describe.summary(config)
  with pytest.raises(UserError, match='a _bas config has variants bas, gaternet_bas, plain'):
    load_experiment('cifar10_resnet20_bas', 'wider')


@pytest.fixture(scope='module')
def local_run(tmp_path_factory):
  """A tiny locally gated run through the procedure: stage 1, no gater stage, the joint stage."""
  workdir = str(tmp_path_factory.mktemp('local_run'))
  config = tiny_default('bas', **{'procedure.pretrain': True, 'max_steps': 4})
  results = procedure.train_and_evaluate(config, workdir)
  return workdir, config, results


@pytest.mark.slow
def test_local_procedure_has_no_gater_stage_and_starts_from_stage_one(local_run):
  workdir, config, results = local_run
  assert set(results['stages']) == {workdir_lib.STAGE_BACKBONE, workdir_lib.STAGE_JOINT}
  assert not os.path.exists(os.path.join(workdir, workdir_lib.STAGE_GATER))
  dataset, setup = _build(config)
  fresh = steps.create_state(setup, 123)
  backbone_dir = os.path.join(workdir, workdir_lib.STAGE_BACKBONE)
  state = procedure.init_from_pretrained(fresh, setup, backbone_dir, None)
  stage1 = restore.load_state(backbone_dir).state
  for unit, params in state.params['backbone'].items():
    for name, leaf_tree in params.items():
      expected = (
        fresh.params['backbone'][unit][name]
        if name == 'gate'
        else stage1.params['backbone'][unit][name]
      )
      for a, b in zip(jax.tree.leaves(leaf_tree), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_evaluate_analyze_and_tradeoff_read_local_gates(local_run, tmp_path):
  workdir, config, _ = local_run
  result = evaluate.evaluate_workdir(workdir, gate_threshold=0.5)
  assert 0 <= result['gate_density'] <= 1 and result['macs'] > 0
  summary = collect.analyze_workdir(workdir, out_dir=str(tmp_path / 'a'), max_examples=60)
  totals = summary['census']['totals']
  assert summary['num_gates'] == 112
  assert totals['filters'] == 112
  assert totals['always_on'] + totals['always_off'] + totals['input_dependent'] == 112
  gates, _, layout = analysis.load_gates(tmp_path / 'a' / 'gates.npz')
  assert gates.shape == (60, 112) and [layer.filters for layer in layout] == [16, 32, 64]
  rows = tradeoff.tradeoff_workdir(workdir, thresholds=(0.0, 2.0), out_dir=str(tmp_path / 't'))
  macs = [row['macs'] for row in rows['rows']]
  assert macs[1] <= macs[0]


def test_configs_keep_gaternets_recipe_for_the_table_rows():
  config = load_experiment('cifar10_resnet20', 'gated')
  assert (config.gating.method, config.gating.binarizer, config.gating.losses) == (
    'gaternet',
    'semhash',
    'l1',
  )
  gb = load_experiment('cifar10_resnet20_bas', 'gaternet_bas')
  assert (gb.gating.method, gb.gating.binarizer) == ('gaternet', 'semhash')
  assert configs.gate_losses(gb) == ('l1', 'batch_shaping')


# --- export of a locally gated model ----------------------------------------------------------

EXPORT_FAMILIES = {
  'cifar_basic': lambda **kw: CifarResNet(depth=8, num_classes=10, **kw),
  'cifar_preact_bottleneck': lambda **kw: CifarResNet(
    depth=11, bottleneck=True, num_classes=10, **kw
  ),
  'imagenet_basic': lambda **kw: ResNet(depth=18, num_classes=10, width=0.25, **kw),
  'imagenet_bottleneck': lambda **kw: ResNet(depth=50, num_classes=10, width=0.125, **kw),
}


def _locally_gated(family, plan=None, gated=True):
  backbone = EXPORT_FAMILIES[family](gate_placement='first', pruning=plan)
  return LocallyGated(backbone) if gated else Classifier(backbone)


def _engineer_gates(model, variables, x, kinds_per_unit, seed):
  """Every unit's gating FC2 made always off (bias -1e3), always on (+1e3) or input-dependent
  per channel (a random kernel, the bias minus the channel's median logit on x: on for about
  half the inputs), unit by unit in order (a unit's gates change the later units' inputs); batch
  norm values moved off their initial values first, so a mis-sliced entry shows in the logits."""
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(np.array, perturbed(jax.device_get(variables), seed))
  gate_logits = jax.jit(lambda v: model.apply(v, x, train=False)[1]['gate_logits'])
  start = 0
  for unit, kinds in kinds_per_unit.items():
    fc2 = variables['params']['backbone'][unit]['gate']['fc2']
    dynamic = kinds == 2
    fc2['kernel'][:] = 0.0
    fc2['kernel'][:, dynamic] = rng.normal(0, 3.0, (fc2['kernel'].shape[0], dynamic.sum()))
    fc2['bias'][:] = np.where(kinds == 1, 1e3, -1e3)
    fc2['bias'][dynamic] = 0.0
    logits = np.asarray(gate_logits(variables))
    fc2['bias'][dynamic] = -np.median(logits[:, start : start + len(kinds)][:, dynamic], axis=0)
    start += len(kinds)
  return variables


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(EXPORT_FAMILIES))
def test_local_export_computes_what_the_locally_gated_model_computed(family):
  source = _locally_gated(family)
  x = jax.random.normal(jax.random.key(1), (24, 32, 32, 3))
  variables = source.init({'params': jax.random.key(0)}, x, train=False)
  model_layout = source.backbone.gate_layout((32, 32, 3))
  rng = np.random.default_rng(3)
  kinds = {}
  for i, layer in enumerate(model_layout):
    k = rng.integers(0, 3, layer.filters)
    k[:3] = (0, 1, 2)
    # The first unit, and the first of stage 2 (its shape changes), lose every filter.
    if i == 0 or layer.name == 'stage2/unit1':
      k[:] = 0
    kinds[layer.name.replace('/', '_')] = k
  variables = _engineer_gates(source, variables, x, kinds, seed=4)
  logits, aux = source.apply(variables, x, train=False)
  gates = np.asarray(aux['gates']) > 0.5
  plan, rows, dynamic = export.plan_from_gates(gates, model_layout)
  assert rows[0]['gates_removed'] == rows[0]['filters']
  assert sum(r['gates_folded'] for r in rows) and len(dynamic)

  pruned = _locally_gated(family, plan, gated=len(dynamic) > 0)
  target = jax.eval_shape(functools.partial(pruned.init, train=False), jax.random.key(0), x)
  cut = export.prune_tree(variables, target, plan, dynamic)
  new_logits, new_aux = pruned.apply(cut, x, train=False)
  np.testing.assert_allclose(new_logits, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(new_aux['gates']) > 0.5, gates[:, dynamic])
  count = lambda tree: sum(v.size for v in jax.tree.leaves(tree))  # noqa: E731
  assert count(cut['params']) < count(variables['params'])
  # The emptied unit has neither its first convolution nor its gating module.
  first = model_layout[0].name.replace('/', '_')
  assert 'conv1' not in cut['params']['backbone'][first]
  assert 'gate' not in cut['params']['backbone'][first]


def test_export_of_a_local_run_end_to_end(local_run, tmp_path):
  workdir, _, _ = local_run
  out = str(tmp_path / 'export')
  result = export.export_workdir(workdir, out=out, max_examples=200)
  assert result['exact_on_calibration']
  assert result['params_after'] <= result['params_before']
  config = workdir_lib.load_config(out)
  assert config.gating.method == 'local' and 'pruning' in config.model
  assert evaluate.evaluate_workdir(out)['examples'] > 0


ONE_VS_FOUR_DEVICES = """
import json, sys
sys.path.insert(0, 'tests')
import jax, numpy as np
from jax.sharding import Mesh
from conftest import tiny_default
from gaternet_jax.training import steps
from gaternet_jax import data as data_lib

config = tiny_default('bas', **{'schedule.warmup_epochs': 0.0, 'gating.losses': 'batch_shaping,l0',
                                'gating.l0_start': 0.0, 'gating.l0_ramp_end': 0.0})
dataset = data_lib.load_dataset(config.data)
images, labels = dataset.train_arrays()
out = {}
for n in (1, 4):
  setup = steps.build(config, dataset.info, mesh=Mesh(np.asarray(jax.devices()[:n]), ('data',)))
  train_step, _, _ = steps.compile_steps(setup)
  batch = {'image': images[:config.batch_size], 'label': labels[:config.batch_size]}
  batch = jax.device_put(batch, setup.data_sharding)
  _, metrics = train_step(steps.create_state(setup, 0), batch, jax.random.key(0))
  out[n] = {k: float(metrics[k]) for k in ('loss', 'batch_shaping', 'l0', 'gate_density')}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_batch_shaping_training_step_on_four_devices_equals_one_device():
  """The batch-shaping term of a data-parallel step is the global batch's (GSPMD sorts across
  the devices), so 4 devices give what 1 device gives for the same global batch and key."""
  values = run_on_cpu_devices(ONE_VS_FOUR_DEVICES, 4, timeout=300)
  one, four = values['1'], values['4']
  assert one['batch_shaping'] > 0 and one['l0'] > 0
  for name in one:
    np.testing.assert_allclose(four[name], one[name], rtol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize('module_weight_decay', [False, True])
def test_weight_decay_skips_the_gating_modules_unless_asked(module_weight_decay):
  """The recipe's script exempts the gating modules from weight decay (it pulls every gate's
  logit towards a fixed value whatever the image); `gating.module_weight_decay` puts it back."""
  config = tiny_default('bas')
  config.gating.module_weight_decay = module_weight_decay
  config.optimizer.weight_decay = 0.1
  _, setup = _build(config)
  # Moved off zero (biases start there), so that every decayed parameter's decay shows.
  params = jax.tree.map(lambda x: x + 1.0, steps.create_state(setup, 0).params)
  tx = steps.make_optimizer(config, lambda step: 1.0)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  moved = {
    jax.tree_util.keystr(path): bool(jnp.any(u != 0))
    for path, u in jax.tree_util.tree_leaves_with_path(updates)
  }
  gate = {k: v for k, v in moved.items() if "['gate']" in k}
  rest = {k: v for k, v in moved.items() if "['gate']" not in k}
  assert gate and all(rest.values())  # zero gradients: only the decay moves anything
  assert all(gate.values()) == module_weight_decay and any(gate.values()) == module_weight_decay
  # A GaterNet has no local gating modules: every parameter decays either way.
  gated = tiny_default('gated')
  gated.optimizer.weight_decay = 0.1
  assert steps.weight_decay_mask(gated) is None
