"""Shake-Shake 26 2xNd (Table 2): gate counts, parameters, the shake op, gating, and training."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_zero_gate, load_experiment, tiny_default

from gaternet_jax import configs, models
from gaternet_jax.commands import describe
from gaternet_jax.errors import UserError
from gaternet_jax.layout import total_filters
from gaternet_jax.models import shake_shake
from gaternet_jax.models.shake_shake import ShakeShake, shake, shake_eval

TINY = 'shake_shake8_2x4d'


def _tiny(**kwargs):
  return models.create_backbone(TINY, num_classes=5, **kwargs)


@pytest.mark.parametrize(
  'name,count', [('shake_shake26_2x64d', 3584), ('shake_shake26_2x96d', 5376)]
)
def test_gate_layout_counts_match_table2(name, count):
  layout = models.create_backbone(name, num_classes=10).gate_layout()
  assert total_filters(layout) == count
  assert len(layout) == 3 * 4 * 2
  n = count // 56  # 4 blocks x 2 branches x (N + 2N + 4N)
  assert [l.filters for l in layout[:8]] == [n] * 8 and layout[-1].filters == 4 * n
  assert layout[0].name == 'stage1/block1/branch1' and layout[-1].name == 'stage3/block4/branch2'
  # The gated conv is the branch's second 3x3 conv over `out` channels at the stage's resolution.
  assert layout[0].macs_per_filter == 9 * n * 32 * 32
  assert layout[-1].macs_per_filter == 9 * 4 * n * 8 * 8


# Table 2: (experiment, variant, gated filters, total parameters).
TABLE2 = [
  ('cifar10_shake_shake26_2x64d', 'plain', 0, 11.71e6),
  ('cifar10_shake_shake26_2x64d', 'gated', 3584, 12.01e6),
  ('cifar10_shake_shake26_2x96d', 'plain', 0, 26.33e6),
  ('cifar10_shake_shake26_2x96d', 'gated', 5376, 26.65e6),
]


@pytest.mark.slow
@pytest.mark.parametrize('name,variant,filters,params', TABLE2)
def test_describe_matches_table2(name, variant, filters, params):
  stats = describe.summary(load_experiment(name, variant))
  assert stats['gated_filters'] == filters
  assert abs(stats['total_params'] / params - 1) < 0.03, stats['total_params']


@pytest.mark.parametrize('name', ['cifar10_shake_shake26_2x64d', 'cifar10_shake_shake26_2x96d'])
def test_experiments_refuse_wider_and_se_and_keep_the_recipe(name):
  for variant in ('wider', 'se'):
    with pytest.raises(UserError, match='no'):
      load_experiment(name, variant)
  c = load_experiment(name)
  assert (
    configs.variant_of(c) == 'gated' and c.model.gated and c.gater.extractor == 'cifar_resnet20'
  )
  assert (c.schedule.name, c.schedule.num_epochs, c.batch_size) == ('cosine', 1800.0, 128)
  assert (c.optimizer.learning_rate, c.optimizer.momentum, c.optimizer.nesterov) == (0.2, 0.9, True)
  assert (c.procedure.joint_extra_epochs, c.procedure.joint_learning_rate) == (30.0, 0.05)
  assert c.gater.dropout_rate == 0.05 and c.gater.bottleneck == 8


def test_se_variant_is_refused_by_the_module():
  with pytest.raises(ValueError, match='no -SE variant'):
    _tiny(se_reduction=4)


def test_shake_forward_per_sample_and_backward_uses_independent_beta():
  b1 = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
  b2 = jax.random.normal(jax.random.key(1), (4, 2, 2, 3))
  alpha = jax.random.uniform(jax.random.key(2), (4,))
  beta = jax.random.uniform(jax.random.key(3), (4,))
  out, vjp = jax.vjp(shake, b1, b2, alpha, beta)
  # Recover each sample's forward weight from the output: w = (out - b2) / (b1 - b2).
  w = np.asarray((out - b2) / (b1 - b2)).reshape(4, -1)
  np.testing.assert_allclose(w, np.repeat(np.asarray(alpha)[:, None], w.shape[1], 1), rtol=1e-4)
  assert np.all((w >= 0) & (w <= 1)) and len(np.unique(np.round(w[:, 0], 5))) == 4
  g = jax.random.normal(jax.random.key(4), out.shape)
  g1, g2, ga, gb = vjp(g)
  bb = np.asarray(beta)[:, None, None, None]
  np.testing.assert_allclose(g1, bb * g, rtol=1e-6)
  np.testing.assert_allclose(g2, (1 - bb) * g, rtol=1e-6)
  assert not np.allclose(g1, np.asarray(alpha)[:, None, None, None] * g)
  assert np.all(np.asarray(ga) == 0) and np.all(np.asarray(gb) == 0)


def test_block_draws_per_sample_coefficients_from_the_gates_stream(monkeypatch):
  """In training the block's alpha differs per sample (and per rng); evaluation needs no rng."""
  model = _tiny()
  x = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  alphas = []
  original = shake

  def spy(b1, b2, alpha, beta):
    alphas.append((np.asarray(alpha), np.asarray(beta)))
    return original(b1, b2, alpha, beta)

  monkeypatch.setattr(shake_shake, 'shake', spy)
  for seed in (1, 2):
    model.apply(variables, x, train=True, rngs={'gates': jax.random.key(seed)}, mutable=True)
  assert len(alphas) == 6  # 3 blocks x 2 rngs
  alpha, beta = alphas[0]
  assert alpha.shape == (6,) and len(np.unique(alpha)) == 6 and np.all((alpha >= 0) & (alpha <= 1))
  assert not np.allclose(alpha, beta)
  assert not np.allclose(alphas[0][0], alphas[1][0])  # blocks draw independently
  assert not np.allclose(alphas[0][0], alphas[3][0])  # and from the step's rng
  model.apply(variables, x, train=False)  # no rng needed


def test_eval_combination_is_exactly_the_mean():
  b1 = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  b2 = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
  np.testing.assert_array_equal(shake_eval(b1, b2), (b1 + b2) / 2)


def test_zero_gate_zeroes_exactly_that_channel_of_that_branch_and_sample(monkeypatch):
  model = _tiny()
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  layout = model.gate_layout((32, 32, 3))
  assert total_filters(layout) == 56
  for layer in (1, 4):  # stage1/block1/branch2 and stage3/block1/branch1
    products = check_zero_gate(monkeypatch, model, variables, x, layout, layer, channel=2)
    assert len(products) == len(layout)


def test_width_scaling_and_features():
  model = ShakeShake(depth=8, base_width=4, width=1.5, include_head=False)
  assert [l.filters for l in model.gate_layout()] == [6, 6, 12, 12, 24, 24]
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert model.apply(variables, x, train=False).shape == (2, 24)
  with pytest.raises(ValueError, match='gate vector'):
    model.apply(variables, x, gates=jnp.ones((2, 7)), train=False)


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['plain', 'gated'])
def test_a_few_training_steps(variant, tmp_path):
  """The tiny net trains on the embedded data (train.run raises on a non-finite training loss);
  gated, all three stages of the procedure run, and the shake coefficients come from 'gates'."""
  from gaternet_jax.training import procedure  # noqa: PLC0415
  from gaternet_jax.training import workdir as workdir_lib  # noqa: PLC0415

  config = tiny_default(variant)
  config.model.backbone = TINY
  workdir = str(tmp_path / 'w')
  results = procedure.train_and_evaluate(config, workdir)
  assert results['backbone'] == TINY and results['step'] == config.max_steps
  assert np.isfinite(results['eval']['loss'])
  if variant == 'gated':
    assert results['stage'] == workdir_lib.STAGE_JOINT and results['gated_filters'] == 56
    for stage in (workdir_lib.STAGE_BACKBONE, workdir_lib.STAGE_GATER, workdir_lib.STAGE_JOINT):
      assert os.path.exists(os.path.join(workdir, stage, 'results.json')), stage
