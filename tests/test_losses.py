"""`losses.objective`: the training loss, assembled in one place from the config."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gaternet_jax import losses


def _config(gated: bool, l1_weight: float = 0.5):
  return ml_collections.ConfigDict(
    {'model': {'gated': gated}, 'gater': {'l1_weight': l1_weight}}
  )


LOGITS = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
LABELS = jnp.array([0, 2])
GATES = jnp.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])


def test_plain_objective_is_cross_entropy():
  loss, terms = losses.objective(LOGITS, LABELS, {}, _config(False))
  np.testing.assert_allclose(loss, losses.cross_entropy(LOGITS, LABELS))
  assert float(terms['sparsity']) == 0.0 and 'l1' not in terms


def test_gated_objective_is_the_papers_loss():
  """L = CE + lambda * ||G(x)||_1 / c (section 3.2.2), each term reported."""
  loss, terms = losses.objective(LOGITS, LABELS, {'gates': GATES}, _config(True, 0.5))
  expected_l1 = 0.5 * np.mean([3 / 4, 1 / 4])
  np.testing.assert_allclose(terms['l1'], expected_l1, rtol=1e-6)
  np.testing.assert_allclose(terms['sparsity'], expected_l1, rtol=1e-6)
  np.testing.assert_allclose(loss, losses.cross_entropy(LOGITS, LABELS) + expected_l1, rtol=1e-6)


def test_a_new_regularizer_plugs_in_without_touching_the_step(monkeypatch):
  monkeypatch.setitem(losses.REGULARIZERS, 'density', lambda aux, config: jnp.mean(aux['gates']))
  monkeypatch.setattr(losses, 'active_regularizers', lambda config: ('l1', 'density'))
  loss, terms = losses.objective(LOGITS, LABELS, {'gates': GATES}, _config(True, 0.0))
  np.testing.assert_allclose(terms['density'], 0.5)
  np.testing.assert_allclose(loss - terms['cross_entropy'], 0.5, rtol=1e-6)


@pytest.mark.parametrize('weight', [0.0, 1.0])
def test_l1_weight_zero_adds_nothing(weight):
  loss, terms = losses.objective(LOGITS, LABELS, {'gates': GATES}, _config(True, weight))
  assert (float(terms['sparsity']) == 0.0) == (weight == 0.0)
