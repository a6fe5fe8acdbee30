"""Inception-v4 (Table 3's last two rows): gated filters, parameters, spatial sizes, gating."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_zero_gate, load_experiment

from gaternet_jax import configs, models
from gaternet_jax.commands import describe
from gaternet_jax.errors import UserError
from gaternet_jax.layout import total_filters
from gaternet_jax.models import layers
from gaternet_jax.models.inception_v4 import InceptionV4

PAPER = {'plain': 44.50e6, 'gated': 61.67e6}
# Our counts: conv + BN without scale (TF-slim), 1000 classes, no auxiliary classifier.
OURS = {'plain': 42_648_232, 'gated': 58_224_840}
# TF-slim's auxiliary classifier at 299x299 (1x1 conv to 128 + BN beta, 5x5 conv to 768 + BN
# beta, FC to 1001 classes), which the training step here has no loss for.
AUX_HEAD = 1024 * 128 + 128 + 5 * 5 * 128 * 768 + 768 + 768 * 1001 + 1001


@pytest.fixture(scope='module')
def summaries():
  out = {}
  for variant in ('plain', 'gated'):
    start = time.perf_counter()
    out[variant] = describe.summary(load_experiment('imagenet_inception_v4', variant))
    out[variant]['seconds'] = time.perf_counter() - start
  return out


@pytest.mark.slow
def test_gated_filters_are_table3s_16608(summaries):
  layout = InceptionV4().gate_layout()
  assert [l.filters for l in layout[:3]] == [160, 192, 384]  # the stem's concatenations
  assert [l.name for l in layout][:5] == [
    'stem/concat1',
    'stem/concat2',
    'stem/concat3',
    'inception_a1',
    'inception_a2',
  ]
  assert len(layout) == 3 + 4 + 1 + 7 + 1 + 3
  assert total_filters(layout) == 16_608
  assert summaries['gated']['gated_filters'] == 16_608
  assert summaries['plain']['gated_filters'] == 0 and summaries['plain']['gater_params'] == 0


def test_parameter_counts_against_table3(summaries):
  """Table 3 is not reproducible by one backbone: its gated - plain difference (17.17M) exceeds the
  gater for 16,608 gates (ResNet-18 extractor + FC 512->256->16,608 = 15.58M), whereas for
  ResNet-101/152 it equals the gater exactly. Our backbone is the standard Inception-v4 (42.65M,
  4.2% under the plain cell; gated 5.6% under); adding TF-slim's auxiliary classifier would give
  46.01M plain (3.4% over) and 61.59M gated (0.1% under)."""
  assert summaries['plain']['total_params'] == OURS['plain']
  assert summaries['gated']['total_params'] == OURS['gated']
  gater = summaries['gated']['gater_params']
  assert gater == 11_176_512 + (512 * 256 + 256) + 2 * 256 + (256 * 16_608 + 16_608)
  assert summaries['gated']['backbone_params'] == OURS['plain']
  assert abs(PAPER['gated'] - PAPER['plain'] - gater) > 1.5e6  # the table's inconsistency
  for variant, paper in PAPER.items():
    assert 0.04 < (paper - OURS[variant]) / paper < 0.06
  # The candidates (BN scale: +31,584; 1001 classes: +1,537) cannot close a 1.85M gap; the aux
  # head matches the gated cell within 0.2% and misses the plain one by 3.4%.
  plain_aux, gated_aux = OURS['plain'] + AUX_HEAD + 1537, OURS['gated'] + AUX_HEAD + 1537
  assert abs(gated_aux - PAPER['gated']) / PAPER['gated'] < 0.002
  assert 0.03 < (plain_aux - PAPER['plain']) / PAPER['plain'] < 0.04


def test_describe_is_abstract_and_fast(summaries):
  for variant in ('plain', 'gated'):
    assert summaries[variant]['seconds'] < 60, summaries
  # Inception-v4 costs ~12.25 GMACs per 299x299 image (convolutions and the classifier).
  assert 12.2e9 < summaries['plain']['backbone_macs'] < 12.3e9


def test_layout_macs_account_for_every_block_convolution(summaries):
  layout = InceptionV4().gate_layout()
  stem = (3 * 3 * 3 * 32) * 149**2 + (3 * 3 * 32 * 32) * 147**2 + (3 * 3 * 32 * 64) * 147**2
  in_blocks = summaries['plain']['backbone_macs'] - stem - 1536 * 1000
  attributed = sum(l.filters * l.macs_per_filter for l in layout)
  assert in_blocks - total_filters(layout) < attributed <= in_blocks


def test_spatial_sizes_are_the_papers(monkeypatch):
  """35x35 after the stem, 17x17 after Reduction-A, 8x8 after Reduction-B, traced abstractly."""
  shapes = []
  original = layers.apply_gate

  def spy(y, gate):
    shapes.append(y.shape)
    return original(y, gate)

  monkeypatch.setattr(layers, 'apply_gate', spy)
  model = InceptionV4()
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.shape == (1, 1000)
  got = {l.name: s[1:] for l, s in zip(model.gate_layout(), shapes[len(shapes) // 2 :])}
  assert len(shapes) == 2 * 19
  assert got['stem/concat1'] == (73, 73, 160)
  assert got['stem/concat2'] == (71, 71, 192)
  assert got['stem/concat3'] == (35, 35, 384)
  assert all(got[f'inception_a{i}'] == (35, 35, 384) for i in range(1, 5))
  assert got['reduction_a'] == (17, 17, 1024)
  assert all(got[f'inception_b{i}'] == (17, 17, 1024) for i in range(1, 8))
  assert got['reduction_b'] == (8, 8, 1536)
  assert all(got[f'inception_c{i}'] == (8, 8, 1536) for i in range(1, 4))


TINY = InceptionV4(num_classes=5, width=0.0625)


@pytest.fixture(scope='module')
def tiny():
  x = jax.random.normal(jax.random.key(1), (3, 75, 75, 3))
  return x, TINY.init(jax.random.key(0), x, train=False), TINY.gate_layout((75, 75, 3))


@pytest.mark.slow
@pytest.mark.parametrize('layer_name,channel', [('inception_a2', 2), ('reduction_a', -1)])
def test_zero_gate_zeroes_exactly_that_channel_of_that_sample(
  tiny, monkeypatch, layer_name, channel
):
  """A conv channel of an Inception-A concatenation, and a max-pooled channel of Reduction-A's."""
  x, variables, layout = tiny
  layer = [l.name for l in layout].index(layer_name)
  channel %= layout[layer].filters
  check_zero_gate(monkeypatch, TINY, variables, x, layout, layer, channel, neighbour=-1)


@pytest.mark.slow
def test_dropout_only_in_training_from_the_gates_stream(tiny):
  x, variables, _ = tiny
  evaluate = jax.jit(lambda: TINY.apply(variables, x, train=False))
  np.testing.assert_array_equal(evaluate(), evaluate())

  @jax.jit
  def train_step(key):
    return TINY.apply(variables, x, train=True, rngs={'gates': key}, mutable=['batch_stats'])[0]

  def train(seed):
    return np.asarray(train_step(jax.random.key(seed)))

  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  features = InceptionV4(width=0.0625, include_head=False).apply(variables, x, train=False)
  assert features.shape == (3, round(1536 * 0.0625))


def test_registry_width_and_se():
  backbone = models.create_backbone('inception_v4', num_classes=1000, width=0.5)
  assert total_filters(backbone.gate_layout()) == 16_608 // 2  # every channel count is even
  with pytest.raises(ValueError, match='no -SE variant'):
    models.create_backbone('inception_v4', num_classes=1000, se_reduction=16)


@pytest.mark.parametrize('variant', ['wider', 'se'])
def test_experiment_refuses_wider_and_se(variant):
  with pytest.raises(UserError, match='plain or gated'):
    load_experiment('imagenet_inception_v4', variant)
  config = load_experiment('imagenet_inception_v4')
  assert configs.variant_of(config) == 'gated' and config.data.image_size == 299
  assert config.gater.dropout_rate == 0.05 and config.optimizer.weight_decay == 4e-5
  assert load_experiment('imagenet_inception_v4', 'plain').gater.dropout_rate == 0.0
