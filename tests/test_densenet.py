"""DenseNet-BC backbones (Table 2): gate placement and counts, parameter counts, eq. 4, training."""

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import check_zero_gate, load_experiment, tiny_default

from gaternet_jax.commands import describe
from gaternet_jax.errors import UserError
from gaternet_jax.layout import total_filters
from gaternet_jax.models import BACKBONES, create_backbone
from gaternet_jax.models.densenet import DenseNetBC

# Table 2: (gated filters, plain parameters, gated parameters).
TABLE2 = {
  'cifar10_densenet_bc100_k12': (540, 0.77e6, 1.05e6),
  'cifar10_densenet_bc250_k24': (2880, 15.32e6, 15.62e6),
  'cifar10_densenet_bc190_k40': (3600, 25.62e6, 25.93e6),
}


@pytest.mark.parametrize('name', TABLE2)
def test_gate_layout_matches_table2(name):
  depth, growth = map(int, name.split('_bc')[1].split('_k'))
  model = BACKBONES[name.removeprefix('cifar10_')](num_classes=10)
  layout = model.gate_layout()
  n = (depth - 4) // 6
  assert total_filters(layout) == TABLE2[name][0] == 3 * (n - 1) * growth
  # Every dense layer but the first of each block, k filters each, 3x3 over the 4k bottleneck.
  assert [layer.name for layer in layout[: n - 1]] == [f'block1/layer{i}' for i in range(2, n + 1)]
  assert layout[n - 1].name == 'block2/layer2'
  assert {layer.filters for layer in layout} == {growth}
  sizes = {1: 32 * 32, 2: 16 * 16, 3: 8 * 8}
  for layer in layout:
    assert layer.macs_per_filter == 9 * 4 * growth * sizes[int(layer.name[5])]


@pytest.mark.slow
@pytest.mark.parametrize('name', TABLE2)
@pytest.mark.parametrize('variant', ['plain', 'gated'])
def test_describe_matches_table2(name, variant):
  stats = describe.summary(load_experiment(name, variant))
  filters, plain, gated = TABLE2[name]
  assert stats['gated_filters'] == (filters if variant == 'gated' else 0)
  expected = gated if variant == 'gated' else plain
  assert stats['total_params'] == pytest.approx(expected, rel=0.03)


def test_width_se_and_depth_arguments():
  wide = create_backbone('densenet_bc40_k4', num_classes=10, width=2.0)
  assert total_filters(wide.gate_layout()) == 3 * 5 * 8
  with pytest.raises(ValueError, match='no -SE variant'):
    create_backbone('densenet_bc40_k4', num_classes=10, se_reduction=4)
  with pytest.raises(ValueError, match='6n \\+ 4'):
    DenseNetBC(depth=41, growth=4).gate_layout()


@pytest.mark.slow
def test_zero_gate_zeroes_exactly_that_channel_of_that_sample(monkeypatch):
  """Evaluation mode: gate 0 zeroes that channel of that dense layer's new feature maps for that
  sample, and every other sample of the batch is bit-identical."""
  model = BACKBONES['densenet_bc40_k4'](num_classes=5)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  layout = model.gate_layout((32, 32, 3))
  layer = 6  # block2/layer3: past a transition
  assert layout[layer].name == 'block2/layer3'
  products = check_zero_gate(monkeypatch, model, variables, x, layout, layer, channel=2)
  assert len(products) == len(layout)  # only the gated layers pass through eq. 4
  assert products[layer].shape == (3, 16, 16, 4)


@pytest.mark.slow
def test_gate_vector_length_is_checked_and_features_without_head():
  model = BACKBONES['densenet_bc40_k4'](num_classes=5)
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='gates 60 filters'):
    model.apply(variables, x, gates=jnp.ones((2, 59)), train=False)
  extractor = BACKBONES['densenet_bc40_k4'](num_classes=5, include_head=False)
  out = jax.eval_shape(lambda: extractor.init_with_output(jax.random.key(0), x, train=False)[0])
  # Channels after block 3: stem 8, +24 -> 32 -> 16, +24 -> 40 -> 20, +24 = 44.
  assert out.shape == (2, 44)


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['plain', 'gated'])
def test_a_few_training_steps_on_the_default_data(variant, tmp_path):
  """Tiny DenseNet-BC on the embedded digits (16x16): plain, and the three stages of section 4.4
  with the default config's ResNet-8 gater extractor."""
  from gaternet_jax.training import procedure  # noqa: PLC0415
  from gaternet_jax.training import workdir as workdir_lib  # noqa: PLC0415

  config = tiny_default(variant)
  config.model.backbone = 'densenet_bc40_k4'
  results = procedure.train_and_evaluate(config, str(tmp_path / 'w'))
  assert results['backbone'] == 'densenet_bc40_k4' and results['step'] == 6
  assert math.isfinite(results['eval']['loss'])
  assert results['gated_filters'] == (60 if variant == 'gated' else 0)
  if variant == 'gated':
    assert set(results['stages']) == set(workdir_lib.STAGES)
    for stage_dir in results['stages'].values():
      assert workdir_lib.is_finished(stage_dir)
      stage = workdir_lib.read_results(stage_dir)
      assert stage['step'] == 6 and math.isfinite(stage['eval']['loss'])


@pytest.mark.parametrize('name', TABLE2)
def test_experiments_refuse_wider_and_se(name):
  assert load_experiment(name).model.gated  # gated is the default
  for variant in ('wider', 'se'):
    with pytest.raises(UserError, match='choose plain or gated'):
      load_experiment(name, variant)
