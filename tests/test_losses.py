"""`losses.objective`: the training loss, assembled in one place from the config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from gaternet_jax import configs
from gaternet_jax.gating import batch_shaping, binarizers
from gaternet_jax.training import losses


def _config(gated: bool, l1_weight: float = 0.5):
  gating = configs.gating_config('gated')
  gating.l1_weight = l1_weight
  return ml_collections.ConfigDict({'model': {'gated': gated}, 'gating': gating})


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
  monkeypatch.setitem(
    losses.REGULARIZERS, 'density', lambda aux, config, progress: jnp.mean(aux['gates'])
  )
  monkeypatch.setattr(losses, 'active_regularizers', lambda config: ('l1', 'density'))
  loss, terms = losses.objective(LOGITS, LABELS, {'gates': GATES}, _config(True, 0.0))
  np.testing.assert_allclose(terms['density'], 0.5)
  np.testing.assert_allclose(loss - terms['cross_entropy'], 0.5, rtol=1e-6)


@pytest.mark.parametrize('weight', [0.0, 1.0])
def test_l1_weight_zero_adds_nothing(weight):
  loss, terms = losses.objective(LOGITS, LABELS, {'gates': GATES}, _config(True, weight))
  assert (float(terms['sparsity']) == 0.0) == (weight == 0.0)


# --- Batch-Shaping's terms through `objective` ------------------------------------------------

GATE_LOGITS = jnp.array([[2.0, -1.0, 0.5, 3.0], [-2.0, 0.0, 1.5, -0.5], [0.3, 1.0, -3.0, 0.0]])


def _bas_config(losses_names: str, binarizer: str = 'gumbel'):
  c = _config(True, 0.5)
  with c.unlocked():
    c.gating = configs.gating_config('bas')
    c.gating.losses = losses_names
    c.gating.binarizer = binarizer
  return c


def test_batch_shaping_and_l0_follow_their_schedules_in_the_objective():
  """gamma_BaS decays 0.75 -> 0 by 20% of training; gamma_L0 is 0 until 20%, full from 60%."""
  c = _bas_config('batch_shaping,l0')
  aux = {'gates': GATES[:1].repeat(3, 0), 'gate_logits': GATE_LOGITS}
  p = jax.nn.sigmoid(GATE_LOGITS)
  # gamma weighs the sum over the network's gates of each gate's batch-shaping loss.
  bas = float(jnp.sum(batch_shaping.batch_shaping_per_gate(p, 0.6, 0.4)))
  total = 1000
  expected = {  # step: (batch-shaping weight, L0 weight)
    0: (0.75, 0.0),
    100: (0.375, 0.0),
    200: (0.0, 0.0),
    400: (0.0, 0.05),
    600: (0.0, 0.1),
    999: (0.0, 0.1),
  }
  for step, (w_bas, w_l0) in expected.items():
    loss, terms = losses.objective(
      LOGITS[:1].repeat(3, 0), LABELS[:1].repeat(3), aux, c, losses.Progress(step, total)
    )
    np.testing.assert_allclose(terms['batch_shaping'], w_bas * bas, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(terms['l0'], w_l0 * float(jnp.mean(p)), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(loss, terms['cross_entropy'] + terms['sparsity'], rtol=1e-6)
    assert 'l1' not in terms


@pytest.mark.parametrize(
  'reduction,expected',
  [('sum', 0.0225 * 2 / 3 + 0.395 / 3), ('mean', (0.0225 * 2 / 3 + 0.395 / 3) / 2)],
)
def test_the_batch_shaping_term_by_hand(reduction, expected):
  """Beta(1, 1) (CDF(x) = x), N = 3 examples, C = 2 gates, gamma = 1, by hand: gate 0's
  probabilities 0.1, 0.5, 0.9 against i/(N+1) = 1/4, 1/2, 3/4 give (0.15^2 + 0 + 0.15^2)/3; gate
  1's 0.2, 0.2, 0.2 give (0.05^2 + 0.3^2 + 0.55^2)/3 = 0.395/3. 'sum' adds the gates (the
  recipe's gamma = 0.75 weighs that sum), 'mean' averages them (runs before 2026-12-05)."""
  c = _bas_config('batch_shaping')
  c.gating.prior_a = c.gating.prior_b = 1.0
  c.gating.batch_shaping_weight = 1.0
  c.gating.batch_shaping_reduction = reduction
  p = jnp.array([[0.1, 0.2], [0.5, 0.2], [0.9, 0.2]])
  aux = {'gates': (p > 0.5).astype(jnp.float32), 'gate_logits': jnp.log(p / (1 - p))}
  _, terms = losses.objective(
    LOGITS[:1].repeat(3, 0), LABELS[:1].repeat(3), aux, c, losses.Progress(0, 100)
  )
  np.testing.assert_allclose(terms['batch_shaping'], expected, rtol=1e-5)


def test_semhash_on_probability_is_the_normal_cdf_and_gumbel_the_sigmoid():
  np.testing.assert_allclose(
    binarizers.on_probability(GATE_LOGITS, 'semhash'), stats.norm.cdf(GATE_LOGITS), rtol=1e-5
  )
  np.testing.assert_allclose(
    binarizers.on_probability(GATE_LOGITS, 'gumbel'), jax.nn.sigmoid(GATE_LOGITS), rtol=1e-6
  )


def test_every_loss_combination_is_accepted_and_unknown_names_are_refused():
  for names in ('', 'l1', 'l0', 'batch_shaping', 'l1,l0', 'batch_shaping, l0, l1'):
    c = _bas_config(names)
    aux = {'gates': GATES[:, :3].T[:2], 'gate_logits': GATE_LOGITS[:2, :3]}
    _, terms = losses.objective(LOGITS, LABELS, aux, c, losses.Progress(500, 1000))
    assert set(terms) - {'cross_entropy', 'sparsity'} == {
      n.strip() for n in names.split(',') if n.strip()
    }
  for bad in ('l2', 'l1,l1'):
    with pytest.raises(configs.UserError, match='gating.losses'):
      losses.objective(LOGITS, LABELS, {'gates': GATES}, _bas_config(bad))


def test_a_config_saved_before_the_gating_section_trains_with_gaternets_l1():
  assert configs.gate_losses(_config(True)) == ('l1',)
  assert configs.gate_losses(_config(False)) == ()
