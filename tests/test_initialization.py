"""Initial variables with one draw per convolution-kernel shape (models/initialization.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gaternet_jax import models
from gaternet_jax.models import initialization

RNGS = {'params': jax.random.key(0), 'gates': jax.random.key(1)}


class TwoInits(nn.Module):
  """Two initializers on equal shapes (they must not share a draw) and a Dense layer."""

  @nn.compact
  def __call__(self, x):
    he = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    lecun = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    x = nn.Conv(8, (3, 3), kernel_init=he, name='stem')(x)
    for i in range(3):
      x = nn.Conv(8, (3, 3), kernel_init=he, name=f'he{i}')(x)
    x = nn.Conv(8, (3, 3), kernel_init=lecun, name='lecun')(x)
    return nn.Dense(4, name='dense')(x.mean((1, 2)))


def _flat_params(variables):
  return traverse_util.flatten_dict(variables['params'])


def test_every_conv_kernel_is_redrawn_and_nothing_else_changes():
  model, x = TwoInits(), jnp.ones((2, 8, 8, 3))
  ours = _flat_params(initialization.init_variables(model, jax.random.key(7), RNGS, x))
  flax_own = _flat_params(model.init(RNGS, x))
  assert ours.keys() == flax_own.keys()
  for path, value in flax_own.items():
    assert ours[path].shape == value.shape and ours[path].dtype == value.dtype
    if path[-1] == 'kernel' and value.ndim == 4:
      assert not np.allclose(ours[path], value), path  # a new draw
    else:
      np.testing.assert_array_equal(ours[path], value)  # untouched: Dense, biases
  kernels = [ours[(f'he{i}', 'kernel')] for i in range(3)] + [ours[('lecun', 'kernel')]]
  for i in range(4):  # kernels of one group, and of equal shape across groups, all differ
    for j in range(i):
      assert not np.allclose(kernels[i], kernels[j])


def test_draws_are_a_pure_function_of_the_key():
  model, x = TwoInits(), jnp.ones((2, 8, 8, 3))

  def init(key):  # a fresh trace and compile each time
    return jax.jit(lambda k: initialization.init_variables(model, k, RNGS, x))(key)

  first, again, other = init(jax.random.key(7)), init(jax.random.key(7)), init(jax.random.key(8))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(first['params']['he0']['kernel'], other['params']['he0']['kernel'])


@pytest.mark.slow
@pytest.mark.parametrize(
  'name, shape', [('cifar_resnet20', (32, 32, 3)), ('inception_v4', (75, 75, 3))]
)
def test_each_kernel_keeps_its_initializers_distribution(name, shape):
  """Per group of equal shape, the redrawn kernels' spread is flax's (He fan-out normal for the
  ResNets, Inception's fan-in truncated normal)."""
  backbone = models.create_backbone(name, num_classes=10)
  model, x = models.Classifier(backbone), jnp.zeros((1, *shape))
  init = jax.jit(lambda k: initialization.init_variables(model, k, RNGS, x, train=False))
  ours = _flat_params(init(jax.random.key(3)))
  flax_own = _flat_params(jax.jit(lambda: model.init(RNGS, x, train=False))())
  by_shape = {}
  for path, value in flax_own.items():
    if path[-1] == 'kernel' and value.ndim == 4:
      by_shape.setdefault(value.shape, []).append(path)
  assert len(by_shape) > 3
  for kernel_shape, paths in by_shape.items():
    if len(paths) * np.prod(kernel_shape) < 20_000:
      continue  # too few values for a tight spread estimate
    theirs = np.concatenate([np.ravel(flax_own[p]) for p in paths])
    mine = np.concatenate([np.ravel(ours[p]) for p in paths])
    assert abs(mine.mean()) < 0.05 * theirs.std()
    np.testing.assert_allclose(mine.std(), theirs.std(), rtol=0.05, err_msg=str(kernel_shape))
