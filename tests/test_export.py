"""`gaternet export` (a pruned static model) and the compute knob (`--gate-threshold`, tradeoff)."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed

from gaternet_jax import layout
from gaternet_jax.commands import export
from gaternet_jax.data import embedded
from gaternet_jax.models import pruning
from gaternet_jax.models.gater import Gater
from gaternet_jax.models.gaternet import Classifier, GaterNet
from gaternet_jax.models.resnet import ResNet
from gaternet_jax.models.resnet_cifar import CifarResNet
from gaternet_jax.training import checkpoints, restore, steps
from gaternet_jax.training import workdir as workdir_lib

OFF, ON, DYNAMIC = 0, 1, 2


def engineered_fc2(kinds: np.ndarray, bottleneck: int, gate_logits, seed: int = 0):
  """FC2 parameters giving gates that are always off, always on or input-dependent.

  `gate_logits(fc2) -> (n, c)` scores sample inputs; each input-dependent gate's bias is set to
  minus its median there, so it is on for about half of them.
  """
  rng = np.random.default_rng(seed)
  kernel = np.zeros((bottleneck, len(kinds)), np.float32)
  bias = np.where(kinds == ON, 1e3, -1e3).astype(np.float32)
  dynamic = kinds == DYNAMIC
  kernel[:, dynamic] = rng.normal(0, 3.0, (bottleneck, dynamic.sum()))
  bias[dynamic] = 0.0
  logits = np.asarray(gate_logits({'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(bias)}))
  bias[dynamic] = -np.median(logits[:, dynamic], axis=0)
  return {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(bias)}


def with_fc2(variables, fc2):
  params = dict(variables['params'])
  params['gater'] = dict(params['gater'], fc2=fc2)
  return {**variables, 'params': params}


def gate_kinds(model_layout, seed: int, empty_layers=()) -> np.ndarray:
  """A random kind per gate, every kind in every layer, all off in `empty_layers`."""
  rng = np.random.default_rng(seed)
  kinds = []
  for i, layer in enumerate(model_layout):
    k = rng.integers(0, 3, layer.filters)
    k[:3] = (OFF, ON, DYNAMIC)
    kinds.append(np.full(layer.filters, OFF) if i in empty_layers else k)
  return np.concatenate(kinds)


def gaternet(backbone_fn, plan=None):
  backbone = backbone_fn(pruning=plan)
  num_gates = layout.total_filters(backbone.gate_layout((32, 32, 3)))
  if plan is not None and num_gates == 0:
    return Classifier(backbone)
  extractor = CifarResNet(depth=8, include_head=False)
  return GaterNet(backbone, Gater(extractor, num_gates=num_gates, bottleneck=8))


FAMILIES = {
  'cifar_basic': functools.partial(CifarResNet, depth=8, num_classes=10),
  'cifar_preact_bottleneck': functools.partial(
    CifarResNet, depth=11, bottleneck=True, num_classes=10
  ),
  'imagenet_basic': functools.partial(ResNet, depth=18, num_classes=10, width=0.25),
  'imagenet_bottleneck': functools.partial(ResNet, depth=50, num_classes=10, width=0.125),
}


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_pruned_model_computes_what_the_gated_model_computed(family):
  backbone_fn = FAMILIES[family]
  source = gaternet(backbone_fn)
  x = jax.random.normal(jax.random.key(1), (24, 32, 32, 3))
  variables = source.init(jax.random.key(0), x, train=False)
  variables = perturbed(variables, 2)
  model_layout = source.backbone.gate_layout((32, 32, 3))
  # The first unit of the second stage changes shape (a projection or padded shortcut): all off.
  second_stage = next(i for i, l in enumerate(model_layout) if l.name.startswith('stage2'))
  kinds = gate_kinds(model_layout, seed=3, empty_layers=(0, second_stage))
  logits_of = lambda fc2: source.apply(with_fc2(variables, fc2), x, train=False)[1]['gate_logits']  # noqa: E731
  variables = with_fc2(variables, engineered_fc2(kinds, 8, logits_of))
  logits, aux = source.apply(variables, x, train=False)
  gates = np.asarray(aux['gates']) > 0.5
  plan, rows, dynamic = export.plan_from_gates(gates, model_layout)

  assert rows[0]['gates_removed'] == rows[0]['filters']
  mixed = [r for r in rows if r['gates_removed'] and r['gates_folded'] and r['gates_kept']]
  assert mixed, 'some layer has always-off, always-on and input-dependent gates'
  assert sum(r['gates_kept'] for r in rows) == len(dynamic)
  np.testing.assert_array_equal(np.flatnonzero(kinds == DYNAMIC), dynamic)

  pruned = gaternet(backbone_fn, plan)
  target = jax.eval_shape(functools.partial(pruned.init, train=False), jax.random.key(0), x)
  cut = export.prune_tree(jax.device_get(variables), target, plan, dynamic)
  new_logits, new_aux = pruned.apply(cut, x, train=False)
  np.testing.assert_array_equal(np.argmax(new_logits, -1), np.argmax(logits, -1))
  np.testing.assert_allclose(new_logits, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(new_aux['gates']) > 0.5, gates[:, dynamic])
  count = lambda tree: sum(v.size for v in jax.tree.leaves(tree))  # noqa: E731
  assert count(cut['params']) < count(variables['params'])


@pytest.mark.slow
def test_export_without_dynamic_gates_is_a_plain_network():
  backbone_fn = FAMILIES['cifar_basic']
  source = gaternet(backbone_fn)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  variables = perturbed(source.init(jax.random.key(0), x, train=False), 4)
  model_layout = source.backbone.gate_layout((32, 32, 3))
  kinds = np.where(gate_kinds(model_layout, seed=5) == DYNAMIC, ON, gate_kinds(model_layout, 5))
  logits_of = lambda fc2: source.apply(with_fc2(variables, fc2), x, train=False)[1]['gate_logits']  # noqa: E731
  variables = with_fc2(variables, engineered_fc2(kinds, 8, logits_of))
  logits, aux = source.apply(variables, x, train=False)
  plan, _, dynamic = export.plan_from_gates(np.asarray(aux['gates']) > 0.5, model_layout)
  assert len(dynamic) == 0
  pruned = gaternet(backbone_fn, plan)
  assert isinstance(pruned, Classifier)
  target = jax.eval_shape(functools.partial(pruned.init, train=False), jax.random.key(0), x)
  cut = export.prune_tree(jax.device_get(variables), target, plan, dynamic)
  assert 'gater' not in cut['params']
  np.testing.assert_allclose(pruned.apply(cut, x, train=False)[0], logits, rtol=1e-4, atol=1e-4)


def test_plan_from_gates_counts():
  model_layout = [layout.GatedLayer('a', 3, 10), layout.GatedLayer('b', 2, 5)]
  gates = np.array([[0, 1, 1, 1, 0], [0, 1, 0, 1, 0]], bool)
  plan, rows, dynamic = export.plan_from_gates(gates, model_layout)
  assert dict(plan)['a'] == pruning.PrunedLayer(kept=(1, 2), gated=(1,))
  assert dict(plan)['b'] == pruning.PrunedLayer(kept=(0,), gated=())
  assert [(r['gates_removed'], r['gates_folded'], r['gates_kept']) for r in rows] == [
    (1, 1, 1),
    (1, 1, 0),
  ]
  np.testing.assert_array_equal(dynamic, [2])
  with pytest.raises(ValueError):
    export.plan_from_gates(gates[:, :4], model_layout)


def test_pruned_layer_rejects_bad_plans():
  with pytest.raises(ValueError):
    pruning.PrunedLayer(kept=(2, 1), gated=())
  with pytest.raises(ValueError):
    pruning.PrunedLayer(kept=(0, 1), gated=(2,))


def test_pruned_units_refuse_squeeze_excitation():
  backbone = CifarResNet(
    depth=8, se_reduction=4, pruning=(('stage1/unit1', pruning.PrunedLayer((0,), ())),)
  )
  with pytest.raises(ValueError, match='squeeze-and-excitation'):
    backbone.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def engineer(source_dir: str, workdir: str, seed: int) -> np.ndarray:
  """Writes the trained run in `source_dir` to `workdir` with its gater's FC2 set so that every
  layer has all three kinds of gate (always off, always on, input-dependent); returns the kinds."""
  loaded = restore.load_state(source_dir)
  info = loaded.setup.info
  model_layout = loaded.setup.model.backbone.gate_layout(info.image_shape)
  kinds = gate_kinds(model_layout, seed=seed)
  variables = {'params': loaded.state.params, 'batch_stats': loaded.state.batch_stats}
  images = embedded.load_arrays()['train'][0][:512]
  x = steps.preprocess(loaded.config, info, jnp.asarray(images), None)
  model = loaded.setup.model
  logits_of = lambda fc2: model.apply(with_fc2(variables, fc2), x, train=False)[1]['gate_logits']  # noqa: E731
  fc2 = engineered_fc2(kinds, loaded.config.gater.bottleneck, logits_of)
  params = with_fc2(variables, fc2)['params']
  state = loaded.state.replace(params=jax.device_put(params, loaded.setup.replicated))
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.save_config(loaded.config, workdir)
  manager = checkpoints.make_manager(workdir, keep=1)
  checkpoints.save(manager, workdir, loaded.step, state)
  checkpoints.finish(manager, workdir, loaded.step)
  return kinds


@pytest.fixture(scope='module')
def engineered_run(gated_run, tmp_path_factory):
  """The tiny trained GaterNet with FC2 set so that every layer has all three kinds of gate."""
  workdir = str(tmp_path_factory.mktemp('engineered'))
  return workdir, engineer(restore.run_dir(gated_run[0]), workdir, seed=7)


@pytest.mark.slow
def test_export_of_a_trained_preactivation_bottleneck_gaternet(tmp_path):
  """The second family, trained: CIFAR pre-activation bottleneck units (ResNet-164's kind), every
  layer with always-off, always-on and input-dependent gates."""
  from conftest import tiny_default  # noqa: PLC0415

  from gaternet_jax.training import procedure  # noqa: PLC0415

  source = str(tmp_path / 'source')
  overrides = {'model.backbone': 'cifar_resnet11', 'procedure.pretrain': False}
  procedure.train_and_evaluate(tiny_default('gated', **overrides), source)
  workdir = str(tmp_path / 'engineered')
  kinds = engineer(restore.run_dir(source), workdir, seed=11)
  result = export.export_workdir(workdir, max_examples=500)
  assert result['exact_on_calibration'] and result['calibration_examples'] == 500
  calibration = result['agreement']['train']
  assert calibration['top1_identical'] == 1.0 and calibration['max_abs_logit_difference'] < 1e-3
  counts = tuple(int((kinds == kind).sum()) for kind in (OFF, ON, DYNAMIC))
  assert (result['gates_removed'], result['gates_folded'], result['gates_kept']) == counts
  assert all(r['gates_removed'] and r['gates_folded'] and r['gates_kept'] for r in result['layers'])
  assert [r['filters'] for r in result['layers']] == [16, 128, 256]
  assert result['params_after'] < result['params_before']
  assert result['macs_after'] < result['macs_before']


@pytest.mark.slow
def test_export_command_end_to_end(engineered_run, tmp_path, cli):
  workdir, kinds = engineered_run
  out = tmp_path / 'export'
  result = cli('export', '--workdir', workdir, '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.load(open(out / 'export.json'))
  assert data['exact_on_calibration']
  calibration = data['agreement']['train']
  assert calibration['top1_identical'] == 1.0 and calibration['max_abs_logit_difference'] < 1e-3
  assert data['calibration_examples'] == 1500 and 'test' in data['agreement']
  assert data['gates_removed'] == (kinds == OFF).sum()
  assert data['gates_folded'] == (kinds == ON).sum()
  assert data['gates_kept'] == (kinds == DYNAMIC).sum()
  assert data['params_after'] < data['params_before']
  assert data['macs_after'] < data['macs_before']
  assert data['dense_macs_after'] < data['dense_macs_before']

  # The export is a run: evaluate, analyze and load_run take it and agree with the source.
  source_eval = json.loads(cli('evaluate', '--workdir', workdir, '--json').stdout)
  evaluated = cli('evaluate', '--workdir', str(out), '--json')
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  exported_eval = json.loads(evaluated.stdout)
  assert exported_eval['gated_filters'] == data['gates_kept']
  agreement = data['agreement']['test']['top1_identical']
  if agreement == 1.0:
    assert exported_eval['top1_error'] == pytest.approx(source_eval['top1_error'])
  analyzed = cli('analyze', '--workdir', str(out), '--out', str(tmp_path / 'an'),
                 '--max-embed-examples', '50')  # fmt: skip
  assert analyzed.returncode == 0, analyzed.stderr[-2000:]
  census = json.load(open(tmp_path / 'an' / 'analysis.json'))['census']['totals']
  assert census['always_off'] == 0  # none of the kept gates was off on all of train
  import gaternet_jax  # noqa: PLC0415

  run = gaternet_jax.load_run(str(out))
  source_run = gaternet_jax.load_run(workdir)
  images = np.asarray(embedded.load_arrays()['train'][0][:64])
  logits, gates = run.predict(images)
  source_logits, source_gates = source_run.predict(images)
  np.testing.assert_allclose(logits, source_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(gates, source_gates[:, kinds == DYNAMIC])
  skipping = gaternet_jax.load_run(workdir, skip_off_units=True, batch_size=16)
  assert skipping.batch_size == 16
  assert skipping.model.backbone.skip_off_units and not source_run.model.backbone.skip_off_units
  skip_logits, skip_gates = skipping.predict(images)
  np.testing.assert_allclose(skip_logits, source_logits, rtol=1e-5, atol=1e-5)  # other batch
  np.testing.assert_array_equal(skip_gates, source_gates)

  # Exporting again to the same place replaces the earlier export of the same run.
  again = cli('export', '--workdir', workdir, '--out', str(out), '--max-examples', '300')
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.load(open(out / 'export.json'))['calibration_examples'] == 300
  assert not os.path.exists(str(out) + '.partial')


def one_error_line(result, *needles):
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  for needle in needles:
    assert needle in errors[0], errors[0]


@pytest.mark.slow
def test_export_bad_input(gated_run, engineered_run, tmp_path, cli):
  source, _ = gated_run
  workdir, _ = engineered_run
  one_error_line(cli('export', '--workdir', str(tmp_path / 'none')), 'does not exist')
  empty = tmp_path / 'empty'
  empty.mkdir()
  one_error_line(cli('export', '--workdir', str(empty)), 'no checkpoint')
  plain = os.path.join(source, 'stage1_backbone')
  one_error_line(cli('export', '--workdir', plain), 'plain model', 'gated run')
  one_error_line(cli('evaluate', '--workdir', plain, '--skip-off-units'), 'needs a GaterNet')
  # An --out holding another run is left as it was.
  other = tmp_path / 'other'
  shutil.copytree(plain, other)
  before = sorted(p.name for p in other.iterdir())
  one_error_line(cli('export', '--workdir', workdir, '--out', str(other)), 'different run')
  assert sorted(p.name for p in other.iterdir()) == before
  one_error_line(cli('export', '--workdir', workdir, '--max-examples', '0'), 'max_examples')
  # A folder named like the export's staging folder that the user made is never deleted.
  mine = tmp_path / 'mydata.partial'
  mine.mkdir()
  (mine / 'notes.txt').write_text('precious')
  out = str(tmp_path / 'mydata')
  one_error_line(
    cli('export', '--workdir', workdir, '--out', out, '--max-examples', '50'),
    'was not made by gaternet export',
  )
  assert (mine / 'notes.txt').read_text() == 'precious' and not os.path.exists(out)


@pytest.mark.slow
def test_gate_threshold_and_tradeoff(engineered_run, tmp_path, cli):
  workdir, _ = engineered_run
  at_zero = json.loads(cli('evaluate', '--workdir', workdir, '--json').stdout)
  higher = cli('evaluate', '--workdir', workdir, '--json', '--gate-threshold=2', '--skip-off-units')
  higher = json.loads(higher.stdout)  # skipping off units: the same numbers as rows[3] below
  assert at_zero['gate_threshold'] == 0.0 and higher['gate_threshold'] == 2.0
  assert higher['gate_density'] < at_zero['gate_density']
  assert higher['macs'] < at_zero['macs']
  out = tmp_path / 'tradeoff'
  result = cli('tradeoff', '--workdir', workdir, '--thresholds=4,-1,0,2,1', '--out', str(out))
  assert result.returncode == 0, result.stderr[-2000:]
  data = json.load(open(out / 'tradeoff.json'))
  rows = data['rows']
  assert [r['threshold'] for r in rows] == [-1.0, 0.0, 1.0, 2.0, 4.0]
  macs = [r['macs'] for r in rows]
  assert all(a >= b for a, b in zip(macs, macs[1:])), macs
  zero = rows[1]
  assert zero['top1_error'] == pytest.approx(at_zero['top1_error'])
  assert zero['macs'] == pytest.approx(at_zero['macs'])
  for key in ('top1_error', 'top5_error', 'gate_density', 'macs'):
    assert rows[3][key] == pytest.approx(higher[key]), key
  assert (out / 'tradeoff.png').stat().st_size > 10_000
  one_error_line(cli('tradeoff', '--workdir', workdir, '--thresholds=1,x'), 'numbers')
  one_error_line(cli('evaluate', '--workdir', workdir, '--gate_threshold=abc'), 'gate_threshold')


def test_macs_used_counts_only_filters_that_are_on():
  from gaternet_jax.commands import describe  # noqa: PLC0415

  stats = {'backbone_macs': 1000, 'gater_macs': 50}
  model_layout = [layout.GatedLayer('a', 2, 100), layout.GatedLayer('b', 1, 10)]
  # 4 examples: gate 0 on for all, gate 1 for half, gate 2 never.
  used = describe.mean_macs_used(stats, model_layout, np.array([4, 2, 0]), 4)
  assert used == 1000 + 50 - 100 * 0.5 - 10
  with pytest.raises(ValueError):
    describe.mean_macs_used(stats, model_layout, np.array([4, 2]), 4)


def test_pruned_layer_gates_only_the_input_dependent_channels():
  y = jnp.ones((2, 1, 1, 4))
  gate = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  plan = pruning.PrunedLayer(kept=(0, 3, 5, 7), gated=(1, 2))
  out = pruning.apply_kept_gates(y, gate, plan)
  np.testing.assert_array_equal(out[:, 0, 0], [[1, 0, 1, 1], [1, 1, 0, 1]])
  shortcut = jnp.zeros((2, 1, 1, 8))
  merged = pruning.add_to_shortcut(shortcut, out, plan)
  np.testing.assert_array_equal(merged[0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 1])


def test_export_refuses_what_it_cannot_prune_exactly():
  from conftest import tiny_default  # noqa: PLC0415

  from gaternet_jax.errors import UserError  # noqa: PLC0415

  export._check_exportable(tiny_default('gated'), 'w')  # the default GaterNet can be exported
  cases = {
    'SE': tiny_default('gated', **{'model.se_reduction': 4}),
    'ResNet backbones': tiny_default('gated', **{'model.backbone': 'densenet_bc100_k12'}),
    'already an export': export.export_config(
      tiny_default('gated'), (('stage1/unit1', pruning.PrunedLayer((0,), ())),), gated=True
    ),
  }
  for needle, config in cases.items():
    with pytest.raises(UserError, match=needle):
      export._check_exportable(config, 'w')


def test_tradeoff_finds_the_plain_models_error_on_the_same_split(gated_run):
  from gaternet_jax.commands import tradeoff  # noqa: PLC0415

  workdir, _ = gated_run
  config = workdir_lib.load_config(restore.run_dir(workdir))
  stage1 = workdir_lib.read_results(os.path.join(workdir, workdir_lib.STAGE_BACKBONE))
  assert tradeoff.plain_error(workdir, config, 'test') == stage1['eval']['top1_error']
  assert tradeoff.plain_error(workdir, config, 'train') is None  # stage 1 was scored on test
