"""Strided convolutions pad like the original implementations; runs saved before keep 'same'."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_default

from gaternet_jax import configs, models
from gaternet_jax.commands import evaluate
from gaternet_jax.models import layers
from gaternet_jax.training import checkpoints, procedure, restore


def _centre_tap(kernel: int):
  """A single-channel kernel that copies the pixel under its centre."""
  w = np.zeros((kernel, kernel, 1, 1), np.float32)
  w[kernel // 2, kernel // 2] = 1.0
  return {'params': {'kernel': jnp.asarray(w)}}


@pytest.mark.parametrize('kernel', [3, 7])
def test_strided_convolution_reads_the_pixels_its_shortcut_takes(kernel):
  # The shortcut of a stride-2 unit takes x[::2, ::2] (or a 1x1 stride-2 projection of it). With
  # symmetric padding the strided branch is centred on those pixels; TF's 'same' pads (k//2 - 1,
  # k//2) on an even size, centring it on x[1::2, 1::2]: one pixel off.
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  for padding, expected in (('symmetric', x[:, ::2, ::2]), ('same', x[:, 1::2, 1::2])):
    y = layers.conv(1, kernel, 2, dtype=jnp.float32, padding=padding).apply(_centre_tap(kernel), x)
    assert y.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(y, expected)


def test_stride_one_and_odd_sizes_pad_the_same_either_way():
  x = jax.random.normal(jax.random.key(1), (1, 7, 9, 3))
  for stride in (1, 2):
    conv = layers.conv(4, 3, stride, dtype=jnp.float32)
    variables = conv.init(jax.random.key(2), x)
    odd = x[:, :, :7]  # 7x7: 'SAME' pads a strided 3x3 by (1, 1) there too
    same = layers.conv(4, 3, stride, dtype=jnp.float32, padding='same')
    np.testing.assert_array_equal(conv.apply(variables, odd), same.apply(variables, odd))
    if stride == 1:
      np.testing.assert_array_equal(conv.apply(variables, x), same.apply(variables, x))


def _strided_paddings(name: str, padding: str, size: int) -> list:
  """(kernel, padding) of every strided convolution in a forward pass of backbone `name`."""
  model = models.create_backbone(name, num_classes=10, strided_padding=padding)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated' and max(eqn.params['window_strides']) > 1:
        kernel = eqn.invars[1].aval.shape[0]
        found.append((kernel, tuple(tuple(p) for p in eqn.params['padding'])))
      if eqn.primitive.name == 'reduce_window_max' and max(eqn.params['window_strides']) > 1:
        found.append((eqn.params['window_dimensions'][1], tuple(eqn.params['padding'][1:3])))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return found


@pytest.mark.slow
@pytest.mark.parametrize(
  'name,size',
  [
    ('cifar_resnet20', 32),
    ('cifar_resnet11', 32),  # pre-activation bottleneck units (ResNet-164's)
    ('resnet18', 64),  # stem, max-pool, basic units with projections
    ('resnet50', 64),  # bottleneck units: the stride on the 3x3
    ('shake_shake8_2x4d', 32),
  ],
)
def test_every_strided_window_pads_symmetrically(name, size):
  found = _strided_paddings(name, 'symmetric', size)
  assert any(k > 1 for k, _ in found)
  for kernel, pads in found:
    half = (kernel - 1) // 2
    assert pads == ((half, half), (half, half)), (kernel, pads)
  # The legacy padding is what older runs computed: 'SAME' on even sizes is lopsided.
  assert any(
    k > 1 and pads[0][0] != pads[0][1] for k, pads in _strided_paddings(name, 'same', size)
  )


def test_padding_changes_no_parameter_or_gate_count():
  for name in ('cifar_resnet56', 'resnet34', 'shake_shake8_2x4d'):
    shapes = {}
    for padding in configs.STRIDED_PADDINGS:
      model = models.create_backbone(name, num_classes=10, strided_padding=padding)
      size = 64 if name.startswith('resnet') else 32
      x = jnp.zeros((1, size, size, 3))
      params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))
      shapes[padding] = (
        jax.tree.map(lambda a: a.shape, params),
        model.gate_layout((size, size, 3)),
      )
    assert shapes['symmetric'] == shapes['same']


def _drop_padding_field(workdir: str) -> None:
  """Makes `workdir`'s config.json look like one saved before 2026-12-05: no
  model.strided_padding, no gating.batch_shaping_reduction or module_weight_decay, and the
  gating modules' FC2 bias at its old default."""
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    stored = json.load(f)
  del stored['model']['strided_padding']
  del stored['gating']['batch_shaping_reduction'], stored['gating']['module_weight_decay']
  stored['gating']['module_init_bias'] = 1.0
  with open(path, 'w') as f:
    json.dump(stored, f)


@pytest.mark.slow
def test_a_run_saved_before_the_field_keeps_computing_what_it_computed(tmp_path):
  old = str(tmp_path / 'old')
  trained = procedure.train_and_evaluate(
    tiny_default('plain', **{'model.strided_padding': 'same'}), old
  )
  before = evaluate.evaluate_workdir(old)
  _drop_padding_field(old)
  assert restore.load_state(old).config.model.strided_padding == 'same'
  after = evaluate.evaluate_workdir(old)
  assert after['top1_error'] == before['top1_error'] and after['loss'] == before['loss']

  # Today's default config resumes it (no conflict) and keeps 'same': retraining from step 3
  # gives the original's final numbers.
  new_config = tiny_default('plain')
  assert new_config.model.strided_padding == 'symmetric'
  kept = checkpoints.keep_stored_recipe(new_config, old)
  assert kept.model.strided_padding == 'same' and new_config.model.strided_padding == 'symmetric'
  assert kept.gating.batch_shaping_reduction == 'mean' and kept.gating.module_weight_decay
  assert kept.gating.module_init_bias == 1.0 and new_config.gating.module_init_bias == 0.0
  resumed = procedure.train_and_evaluate(new_config, old, resume_step=3)
  assert resumed['step'] == trained['step']
  assert resumed['eval']['top1_error'] == trained['eval']['top1_error']
  assert resumed['eval']['loss'] == pytest.approx(trained['eval']['loss'], rel=1e-6)

  # The same parameters under the new padding compute something else: the field matters.
  stored = json.load(open(os.path.join(old, 'config.json')))
  stored['model']['strided_padding'] = 'symmetric'
  json.dump(stored, open(os.path.join(old, 'config.json'), 'w'))
  assert evaluate.evaluate_workdir(old)['loss'] != before['loss']


def test_pretrained_stage_with_other_padding_is_refused(tmp_path):
  from gaternet_jax.errors import UserError  # noqa: PLC0415

  source = str(tmp_path / 'source')
  procedure.train_and_evaluate(tiny_default('plain', **{'model.strided_padding': 'same'}), source)
  config = tiny_default('gated', **{'init.backbone': source})
  with pytest.raises(UserError, match='model.strided_padding=same'):
    procedure.check_init_sources(config)
