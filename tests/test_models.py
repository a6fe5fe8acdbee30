"""Backbones, gating (paper eq. 4), the gater, GaterNet, and the sparsity term's gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import check_zero_gate

from gaternet_jax import models
from gaternet_jax.errors import UserError
from gaternet_jax.gating import binarizers
from gaternet_jax.layout import total_filters
from gaternet_jax.models.resnet import ResNet
from gaternet_jax.models.resnet_cifar import CifarResNet
from gaternet_jax.training import losses

TINY_BACKBONES = [
  CifarResNet(depth=8, num_classes=5),
  CifarResNet(depth=11, num_classes=5, bottleneck=True),
  CifarResNet(depth=8, num_classes=5, se_reduction=4),
  ResNet(depth=18, num_classes=5, width=0.125),  # ImageNet layout at 32x32
]


def _init(model, x):
  return model.init(jax.random.key(0), x, train=False)


@pytest.mark.slow
@pytest.mark.parametrize('model', TINY_BACKBONES, ids=lambda m: f'{type(m).__name__}')
def test_zero_gate_zeroes_exactly_that_channel_of_that_sample(model, monkeypatch):
  """Evaluation mode: gate 0 zeroes that channel of the gated layer's output for that sample,
  and every other sample of the batch is untouched."""
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = _init(model, x)
  check_zero_gate(
    monkeypatch, model, variables, x, model.gate_layout((32, 32, 3)), layer=1, channel=2
  )


def test_apply_gate_is_eq4_per_sample_and_channel():
  from gaternet_jax.models.layers import apply_gate

  y = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  g = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
  out = apply_gate(y, g)
  np.testing.assert_array_equal(out[0, ..., 1], 0.0)
  np.testing.assert_array_equal(out[1, ..., 0], 0.0)
  np.testing.assert_array_equal(out[0, ..., 0], y[0, ..., 0])
  np.testing.assert_array_equal(out[1, ..., 1:], y[1, ..., 1:])
  assert apply_gate(y, None) is y


@pytest.mark.slow
@pytest.mark.parametrize('model', TINY_BACKBONES, ids=lambda m: f'{type(m).__name__}')
def test_gates_none_equals_all_ones(model):
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _init(model, x)
  c = total_filters(model.gate_layout((32, 32, 3)))
  for train in (False, True):
    plain = model.apply(variables, x, train=train, mutable=['batch_stats'] if train else False)
    ones = model.apply(
      variables, x, gates=jnp.ones((2, c)), train=train, mutable=['batch_stats'] if train else False
    )
    np.testing.assert_allclose(jax.tree.leaves(plain)[0], jax.tree.leaves(ones)[0], rtol=1e-6)


def test_wrong_gate_length_is_rejected():
  model = CifarResNet(depth=8, num_classes=3)
  x = jnp.zeros((1, 32, 32, 3))
  variables = _init(model, x)
  with pytest.raises(ValueError, match='gate vector'):
    model.apply(variables, x, gates=jnp.ones((1, 7)), train=False)


@pytest.mark.parametrize(
  'name,count',
  [
    ('cifar_resnet20', 336),
    ('cifar_resnet56', 1008),
    ('cifar_resnet164', 7200),
    ('resnet34', 3776),
    ('resnet101', 32512),
    ('resnet152', 47872),
  ],
)
def test_gate_layout_counts_match_paper(name, count):
  backbone = models.create_backbone(name, num_classes=10)
  layout = backbone.gate_layout()
  assert total_filters(layout) == count
  assert all(l.filters > 0 and l.macs_per_filter > 0 for l in layout)


def test_gate_layout_structure_resnet164():
  layout = models.create_backbone('cifar_resnet164', num_classes=10).gate_layout()
  assert len(layout) == 54
  assert [l.filters for l in layout[:18]] == [16] * 18
  assert [l.filters for l in layout[18:36]] == [128] * 18
  assert layout[0].name == 'stage1/unit1' and layout[-1].name == 'stage3/unit18'
  # Last conv of a bottleneck is 1x1 over `mid` channels: 4 channels x 32 x 32 positions.
  assert layout[0].macs_per_filter == 4 * 32 * 32


def test_unknown_model_name_is_a_user_error():
  with pytest.raises(UserError, match='unknown model name'):
    models.create_backbone('resnet7', num_classes=10)


def _gated_config(backbone='cifar_resnet8', extractor='cifar_resnet8'):
  c = ml_collections.ConfigDict()
  c.model = dict(backbone=backbone, width=1.0, se_reduction=0, gated=True)
  c.gater = dict(extractor=extractor, extractor_width=1.0, bottleneck=4, init_bias=1.0)
  return c


def test_gaternet_outputs_and_init_behaviour():
  model = models.create_model(_gated_config(), num_classes=4, image_shape=(16, 16, 1))
  x = jax.random.normal(jax.random.key(0), (5, 16, 16, 1))
  variables = model.init({'params': jax.random.key(0)}, x, train=False)
  assert set(variables['params']) == {'backbone', 'gater'}
  assert set(variables['params']['gater']) == {'extractor', 'fc1', 'bn', 'fc2'}
  logits, aux = model.apply(variables, x, train=False)
  assert logits.shape == (5, 4) and aux['gates'].shape == (5, 112)
  # FC2 starts at zero kernel and positive bias: every gate is open, so the GaterNet computes
  # exactly what its backbone alone computes.
  assert float(aux['density']) == 1.0
  backbone_only = model.backbone.apply(
    {
      'params': variables['params']['backbone'],
      'batch_stats': variables['batch_stats']['backbone'],
    },
    x,
    train=False,
  )
  np.testing.assert_allclose(logits, backbone_only, rtol=1e-6)
  (train_logits, train_aux), _ = model.apply(
    variables, x, train=True, rngs={'gates': jax.random.key(1)}, mutable=['batch_stats']
  )
  assert train_logits.shape == (5, 4) and 0.0 < float(train_aux['density']) <= 1.0


def test_gate_dropout_drops_gates():
  model = models.create_model(_gated_config(), num_classes=4, image_shape=(16, 16, 1))
  x = jnp.ones((64, 16, 16, 1))
  variables = model.init({'params': jax.random.key(0)}, x, train=False)
  densities = []
  for rate in (0.0, 0.5):
    (_, aux), _ = model.apply(
      variables,
      x,
      train=True,
      gate_dropout_rate=rate,
      rngs={'gates': jax.random.key(3)},
      mutable=['batch_stats'],
    )
    densities.append(float(aux['density']))
  assert densities[1] < 0.7 * densities[0]


@pytest.mark.parametrize('binarizer', ['semhash', 'gumbel'])
def test_a_zero_dropout_rate_draws_no_mask_and_changes_nothing(binarizer):
  """A final rate of 0 (a Python 0, as the train step passes it) gives exactly the gates of a
  traced rate of 0, whose mask keeps everything, and draws one random array fewer."""
  logits = jnp.linspace(-3.0, 3.0, 6 * 20).reshape(6, 20)
  key = jax.random.key(5)

  def gates(rate):
    return binarizers.sample_gates(logits, binarizer, train=True, key=key, dropout_rate=rate)

  traced_zero = jax.jit(gates)(jnp.float32(0.0))
  np.testing.assert_array_equal(jax.jit(lambda: gates(0.0))(), traced_zero)
  draws = [
    str(jax.make_jaxpr(fn)(*args)).count('random_bits')
    for fn, args in ((lambda: gates(0.0), ()), (gates, (jnp.float32(0.0),)))
  ]
  assert draws[0] == draws[1] - 1


@pytest.mark.slow
def test_sparsity_term_gives_backbone_exactly_zero_gradient():
  model = models.create_model(_gated_config(), num_classes=4, image_shape=(16, 16, 1))
  x = jax.random.normal(jax.random.key(0), (6, 16, 16, 1))
  variables = model.init({'params': jax.random.key(0)}, x, train=False)
  # Make FC2 non-trivial so gradients flow everywhere in the gater.
  params = jax.tree.map(
    lambda p: p + 0.05 * jax.random.normal(jax.random.key(9), p.shape), variables['params']
  )

  def sparsity(p):
    (_, aux), _ = model.apply(
      {'params': p, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      rngs={'gates': jax.random.key(4)},
      mutable=['batch_stats'],
    )
    return losses.gate_l1(aux['gates'], 0.7)

  grads = jax.grad(sparsity)(params)
  for leaf in jax.tree.leaves(grads['backbone']):
    assert np.all(np.asarray(leaf) == 0.0)
  gater_norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads['gater']))
  assert gater_norm > 0


def test_gate_l1_value_and_gradient():
  gates = jnp.array([[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 1.0]])
  # lambda * mean_b(||g_b||_1 / c) = 0.3 * mean(2.5/4, 1/4)
  np.testing.assert_allclose(losses.gate_l1(gates, 0.3), 0.3 * (2.5 / 4 + 1 / 4) / 2, rtol=1e-6)
  grad = jax.grad(lambda g: losses.gate_l1(g, 0.3))(gates)
  np.testing.assert_allclose(grad, np.full((2, 4), 0.3 / (4 * 2)), rtol=1e-6)


def test_cross_entropy_and_topk():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
  labels = jnp.array([0, 2])
  expected = -np.mean(
    [np.log(np.exp(2) / np.exp([2, 1, 0]).sum()), np.log(np.exp(1) / np.exp([0, 3, 1]).sum())]
  )
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1), [1.0, 0.0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 2), [1.0, 1.0])
  masked = losses.cross_entropy(logits, labels, jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(masked, -np.log(np.exp(2) / np.exp([2, 1, 0]).sum()), rtol=1e-6)


@pytest.mark.slow
def test_model_and_training_code_import_without_tensorflow():
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  code = (
    'import sys, gaternet_jax.models, gaternet_jax.training.loop, gaternet_jax.training.procedure, '
    'gaternet_jax.gating.semhash, gaternet_jax.commands.describe, gaternet_jax.analysis.collect, '
    'gaternet_jax.training.restore, gaternet_jax.commands.evaluate, gaternet_jax.commands.sweep, gaternet_jax.cli; '
    'assert "tensorflow" not in sys.modules, "tensorflow was imported"'
  )
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
