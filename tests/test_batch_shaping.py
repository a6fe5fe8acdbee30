"""Batch-shaping, L0 and the Gumbel-sigmoid gate: values, gradients, global batch, schedules."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_cpu_devices
from scipy import special, stats

from gaternet_jax.gating import batch_shaping, gumbel
from gaternet_jax.models import layers

A, B = batch_shaping.BETA_PRIOR_A, batch_shaping.BETA_PRIOR_B
# The clip bounds as float32 inputs see them: 1 - 1e-6 rounds to 1 - 1.013e-6 in float32, which
# moves F(1 - eps; 0.6, 0.4) = 0.997 by 1.5e-5 (the CDF is steep there).
LOW, HIGH = float(np.float32(batch_shaping.CDF_EPS)), float(np.float32(1 - batch_shaping.CDF_EPS))


def _expected_loss(values, a, b):
  """The loss in float64 NumPy/SciPy: mean over gates of (1/N) sum_i (F(x*_i) - i/(N+1))^2."""
  values = np.sort(np.asarray(values, np.float64), axis=0)
  n = values.shape[0]
  cdf = special.betainc(a, b, np.clip(values, LOW, HIGH))
  expected = np.arange(1, n + 1)[:, None] / (n + 1)
  return np.mean(np.mean((cdf - expected) ** 2, axis=0))


# --- a. values ---------------------------------------------------------------------------------


def test_beta_cdf_matches_scipy_and_is_safe_at_the_ends():
  x = jnp.array([0.0, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0])
  np.testing.assert_allclose(
    batch_shaping.beta_cdf(x, A, B), stats.beta.cdf(np.clip(x, LOW, HIGH), A, B), rtol=1e-5
  )
  grad = jax.vmap(jax.grad(lambda v: batch_shaping.beta_cdf(v, A, B)))(x)
  assert np.all(np.isfinite(grad))
  assert grad[0] == 0.0 and grad[-1] == 0.0  # clipped: no inf pdf at the ends of Beta(0.6, 0.4)
  np.testing.assert_allclose(grad[1:-1], stats.beta.pdf(np.asarray(x[1:-1]), A, B), rtol=1e-4)


def test_exact_small_case_uniform_prior():
  """Beta(1, 1) is uniform, F(x) = x, so the loss is the mean of (x*_i - i/4)^2 for N = 3."""
  values = jnp.array([[0.7, 0.9], [0.2, 0.1], [0.5, 0.3]])
  # Column 0 sorted: 0.2, 0.5, 0.7 vs 1/4, 2/4, 3/4 -> residuals -0.05, 0, -0.05: sum 0.005.
  # Column 1 sorted: 0.1, 0.3, 0.9 -> residuals -0.15, -0.2, 0.15: sum 0.085.
  per_gate = batch_shaping.batch_shaping_per_gate(values, 1.0, 1.0)
  np.testing.assert_allclose(per_gate, [0.005 / 3, 0.085 / 3], rtol=1e-5)
  np.testing.assert_allclose(batch_shaping.batch_shaping_loss(values, 1.0, 1.0), 0.015, rtol=1e-5)


def test_small_case_beta_prior_matches_scipy():
  values = np.array([[0.93, 0.05, 0.4], [0.12, 0.61, 0.02], [0.55, 0.99, 0.75]], np.float32)
  np.testing.assert_allclose(
    batch_shaping.batch_shaping_loss(jnp.asarray(values)), _expected_loss(values, A, B), rtol=1e-5
  )


def test_near_zero_for_samples_from_the_prior_and_large_for_constant_gates():
  n, c = 512, 16
  # If x ~ F then F(x) ~ U(0, 1) and F(x*_i) is the i-th uniform order statistic: mean i/(N+1),
  # variance i(N+1-i) / ((N+1)^2 (N+2)). Averaged over i the loss's expectation is exactly
  # sum_i i(N+1-i) / (N (N+1)^2 (N+2)) = 1 / (6 (N+1)); over 16 gates it concentrates near that.
  expected = 1.0 / (6 * (n + 1))
  samples = np.random.default_rng(0).beta(A, B, size=(n, c)).astype(np.float32)
  from_prior = float(batch_shaping.batch_shaping_loss(jnp.asarray(samples)))
  assert expected / 3 < from_prior < 3 * expected, (from_prior, expected)
  for constant in (0.5, 1.0):
    values = jnp.full((n, c), constant)
    loss = float(batch_shaping.batch_shaping_loss(values))
    np.testing.assert_allclose(loss, _expected_loss(values, A, B), rtol=1e-5)
    assert loss > 100 * expected, (constant, loss)  # ~0.09 and ~1/3 vs ~3e-4


def test_rejects_values_that_are_not_examples_by_gates():
  with pytest.raises(ValueError, match='examples, gates'):
    batch_shaping.batch_shaping_loss(jnp.zeros((4, 2, 3)))


def test_bfloat16_values_are_computed_in_float32():
  values = jnp.asarray(np.random.default_rng(1).uniform(size=(32, 4)), jnp.bfloat16)
  loss, grad = jax.value_and_grad(batch_shaping.batch_shaping_loss)(values)
  assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(loss, _expected_loss(values.astype(np.float32), A, B), rtol=1e-5)


# --- b. gradient -------------------------------------------------------------------------------


def test_gradient_matches_the_papers_formula_and_finite_differences():
  n, c = 16, 3
  rng = np.random.default_rng(2)
  # Distinct values at least 1/64 apart in each column (no ties, so the sort order is stable
  # under the finite-difference step), away from the clipped ends.
  grid = (np.arange(n)[:, None] + 1.0) / (n + 2) + rng.uniform(0, 1 / 64, (n, c))
  values = np.stack([rng.permutation(grid[:, j]) for j in range(c)], axis=1)
  with jax.enable_x64(True):
    x = jnp.asarray(values, jnp.float64)
    loss = jax.jit(batch_shaping.batch_shaping_loss)
    grad = np.asarray(jax.grad(batch_shaping.batch_shaping_loss)(x))
    assert grad.dtype == np.float64
    # The paper: d L / d X*_i = 2 f(X*_i) (F(X*_i) - i/(N+1)); our normalisation adds 1/(N C).
    order = np.argsort(values, axis=0)
    ordered = np.take_along_axis(values, order, axis=0)
    residual = special.betainc(A, B, ordered) - np.arange(1, n + 1)[:, None] / (n + 1)
    sorted_grad = 2 * stats.beta.pdf(ordered, A, B) * residual / (n * c)
    formula = np.empty_like(values)
    np.put_along_axis(formula, order, sorted_grad, axis=0)
    np.testing.assert_allclose(grad, formula, rtol=1e-9, atol=1e-13)
    # Central differences, h = 1e-6: truncation error O(h^2) ~ 1e-12.
    h = 1e-6
    numeric = np.empty_like(values)
    for index in np.ndindex(values.shape):
      step = np.zeros_like(values)
      step[index] = h
      numeric[index] = (float(loss(x + step)) - float(loss(x - step))) / (2 * h)
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)


def test_gradient_is_finite_for_saturated_gates():
  values = jnp.array([[0.0, 1.0], [1.0, 0.3], [0.2, 0.0], [1.0, 1.0]])
  grad = jax.grad(batch_shaping.batch_shaping_loss)(values)
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[np.asarray(values) == 0.0] == 0.0)


# --- c. the global batch under data parallelism ------------------------------------------------

FOUR_DEVICES = textwrap.dedent("""
    import json
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gaternet_jax.gating import batch_shaping
    assert jax.device_count() == 4, jax.devices()
    values = np.random.default_rng(0).uniform(0.01, 0.99, (64, 6)).astype(np.float32)
    loss_and_grad = jax.jit(jax.value_and_grad(batch_shaping.batch_shaping_loss))
    one_loss, one_grad = loss_and_grad(jax.device_put(values, jax.devices()[0]))
    mesh = Mesh(np.asarray(jax.devices()), ('data',))
    sharded = jax.device_put(values, NamedSharding(mesh, P('data')))
    assert {s.data.shape for s in sharded.addressable_shards} == {(16, 6)}
    four_loss, four_grad = loss_and_grad(sharded)
    assert len(four_grad.sharding.device_set) == 4
    np.testing.assert_allclose(four_loss, one_loss, rtol=1e-6)
    np.testing.assert_allclose(four_grad, one_grad, rtol=1e-6, atol=1e-9)
    per_shard = np.mean(
      [batch_shaping.batch_shaping_loss(values[16 * k:16 * (k + 1)]) for k in range(4)]
    )
    print(json.dumps({'global': float(four_loss), 'per_shard_mean': float(per_shard)}))
""")


def test_four_devices_compute_the_global_batch_loss():
  values = run_on_cpu_devices(FOUR_DEVICES, 4, timeout=300)
  # The sharded value is the global one, not an average of per-device losses (which differs).
  assert abs(values['global'] - values['per_shard_mean']) > 1e-4, values


# --- d. the Gumbel-sigmoid gate ----------------------------------------------------------------

T = gumbel.GUMBEL_TEMPERATURE


def test_logistic_noise_has_the_logistic_law():
  noise = np.asarray(gumbel.logistic_noise(jax.random.key(0), (200_000,)))
  assert noise.dtype == np.float32
  # Logistic(0, 1): mean 0, variance pi^2/3 (the difference of two Gumbel(0, 1) variables).
  assert abs(noise.mean()) < 0.02
  assert abs(noise.var() / (np.pi**2 / 3) - 1) < 0.02
  assert stats.kstest(noise, stats.logistic.cdf).pvalue > 1e-3


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_training_forward_is_exactly_binary_and_the_sign_of_the_noisy_logit(dtype):
  logits = (jax.random.normal(jax.random.key(0), (64, 32)) * 3).astype(dtype)
  key = jax.random.key(1)
  gates = gumbel.gumbel_sigmoid_gate(logits, key, temperature=T, train=True)
  assert gates.dtype == dtype and gates.shape == logits.shape
  assert set(np.unique(np.asarray(gates, np.float32))) == {0.0, 1.0}
  noisy = np.asarray(logits, np.float32) + np.asarray(gumbel.logistic_noise(key, logits.shape))
  np.testing.assert_array_equal(np.asarray(gates, np.float32), (noisy > 0).astype(np.float32))
  relaxed = gumbel.relaxed_gate(logits, gumbel.logistic_noise(key, logits.shape), T)
  clear = np.abs(np.asarray(relaxed) - 0.5) > 1e-6
  np.testing.assert_array_equal(
    np.asarray(gates, np.float32)[clear], (np.asarray(relaxed) > 0.5)[clear]
  )


def test_gradient_is_the_relaxed_sigmoids_gradient_for_the_same_key():
  logits = jax.random.normal(jax.random.key(2), (32, 24)) * 2
  weights = jax.random.normal(jax.random.key(3), logits.shape)
  key = jax.random.key(4)
  noise = gumbel.logistic_noise(key, logits.shape)

  def hard(x):
    return jnp.sum(weights * gumbel.gumbel_sigmoid_gate(x, key, temperature=T, train=True))

  def relaxed(x):
    return jnp.sum(weights * jax.nn.sigmoid((x + noise) / T))

  r = gumbel.relaxed_gate(logits, noise, T)
  # d relaxed / d alpha = r (1 - r) / tau, evaluated on the very same r.
  np.testing.assert_allclose(jax.grad(hard)(logits), weights * r * (1 - r) / T, rtol=1e-6)
  # Autodiff of the relaxed sigmoid agrees up to float32 rounding: XLA may round the sigmoid's
  # argument (alpha + L) / tau differently by an ulp, which moves r (1 - r) by up to |y| 2^-23
  # relative per ulp (|y| reaches ~20 here).
  np.testing.assert_allclose(jax.grad(hard)(logits), jax.grad(relaxed)(logits), rtol=5e-5)
  # Under jit too, and with another temperature (the gradient scales with 1/tau).
  hard_jit = jax.jit(
    jax.grad(
      lambda x: jnp.sum(weights * gumbel.gumbel_sigmoid_gate(x, key, temperature=0.3, train=True))
    )
  )
  s = gumbel.relaxed_gate(logits, noise, 0.3)
  np.testing.assert_allclose(hard_jit(logits), weights * s * (1 - s) / 0.3, rtol=5e-5)


def test_gates_are_on_with_probability_sigmoid_of_the_logit():
  logits = jnp.full((20_000,), 0.8)
  gates = gumbel.gumbel_sigmoid_gate(logits, jax.random.key(5), temperature=T, train=True)
  # sd of the mean: sqrt(0.69 * 0.31 / 20000) = 0.0033.
  assert abs(float(gates.mean()) - float(gumbel.gate_on_probability(logits[0]))) < 0.012


def test_evaluation_is_deterministic_hard_step():
  logits = jnp.array([[-2.0, -1e-3, 0.0, 1e-3, 5.0]])
  first = gumbel.gumbel_sigmoid_gate(logits, jax.random.key(0), train=False)
  second = gumbel.gumbel_sigmoid_gate(logits, jax.random.key(1), train=False)
  np.testing.assert_array_equal(first, [[0.0, 0.0, 0.0, 1.0, 1.0]])
  np.testing.assert_array_equal(first, second)
  np.testing.assert_array_equal(first, gumbel.gumbel_sigmoid_gate(logits, None, train=False))


def test_training_needs_a_key_and_a_positive_temperature():
  with pytest.raises(ValueError, match='PRNG key'):
    gumbel.gumbel_sigmoid_gate(jnp.zeros((2, 3)), None, train=True)
  with pytest.raises(ValueError, match='temperature'):
    gumbel.gumbel_sigmoid_gate(jnp.zeros((2, 3)), jax.random.key(0), temperature=0.0, train=True)


def test_a_zero_gate_zeroes_exactly_that_channel_of_that_sample():
  features = jax.random.uniform(jax.random.key(6), (4, 5, 5, 6), minval=0.5, maxval=2.0)
  logits = jax.random.normal(jax.random.key(7), (4, 6))
  gates = gumbel.gumbel_sigmoid_gate(logits, jax.random.key(8), temperature=T, train=True)
  out = np.asarray(layers.apply_gate(features, gates))
  features, gates = np.asarray(features), np.asarray(gates)
  assert (gates == 0).any() and (gates == 1).any()
  for n, c in np.ndindex(gates.shape):
    expected = 0.0 if gates[n, c] == 0 else features[n, :, :, c]
    np.testing.assert_array_equal(out[n, :, :, c], expected)


# --- e. L0 -------------------------------------------------------------------------------------


def test_l0_value_and_gradient():
  logits = jnp.array([[-2.0, 0.0, 3.0], [1.0, -1.0, 0.5]])
  s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  np.testing.assert_allclose(batch_shaping.l0_loss(logits), s.mean(), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(batch_shaping.l0_loss)(logits), s * (1 - s) / 6, rtol=1e-5)
  assert float(batch_shaping.l0_loss(jnp.zeros((7, 5)))) == 0.5
  assert batch_shaping.l0_loss(logits.astype(jnp.bfloat16)).dtype == jnp.float32


# --- f. schedules ------------------------------------------------------------------------------


def test_batch_shaping_weight_decays_linearly_to_zero():
  weight = jax.jit(lambda t: batch_shaping.batch_shaping_weight(t, end_step=1000))
  for step, expected in [(0, 0.75), (250, 0.5625), (500, 0.375), (1000, 0.0), (5000, 0.0)]:
    np.testing.assert_allclose(weight(step), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
      batch_shaping.batch_shaping_weight(step, end_step=1000), expected, rtol=1e-6, atol=1e-7
    )
  np.testing.assert_allclose(
    batch_shaping.batch_shaping_weight(3, end_step=4, initial_weight=2.0), 0.5
  )
  with pytest.raises(ValueError):
    batch_shaping.batch_shaping_weight(0, end_step=0)


def test_l0_weight_is_off_then_ramps_then_holds():
  kwargs = {'final_weight': 0.2, 'start_step': 100, 'ramp_end_step': 300}
  weight = jax.jit(lambda t: batch_shaping.l0_weight(t, **kwargs))
  for step, expected in [(0, 0.0), (99, 0.0), (100, 0.0), (200, 0.1), (300, 0.2), (10**6, 0.2)]:
    np.testing.assert_allclose(weight(step), expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(batch_shaping.l0_weight(step, **kwargs), expected, atol=1e-7)
  step_fn = {'final_weight': 0.5, 'start_step': 10, 'ramp_end_step': 10}
  assert [float(batch_shaping.l0_weight(t, **step_fn)) for t in (9, 10, 11)] == [0.0, 0.5, 0.5]
  with pytest.raises(ValueError):
    batch_shaping.l0_weight(0, final_weight=1.0, start_step=5, ramp_end_step=4)


def test_paper_recipe_constants():
  assert (batch_shaping.BETA_PRIOR_A, batch_shaping.BETA_PRIOR_B) == (0.6, 0.4)
  assert stats.beta.mean(A, B) == pytest.approx(0.6)  # gates on for ~60% of the images
  assert batch_shaping.BATCH_SHAPING_WEIGHT == 0.75
  assert batch_shaping.BATCH_SHAPING_END_EPOCH <= batch_shaping.L0_START_EPOCH
  assert batch_shaping.L0_START_EPOCH < batch_shaping.L0_RAMP_END_EPOCH
  assert batch_shaping.L0_RAMP_END_EPOCH < batch_shaping.CIFAR10_EPOCHS
  assert gumbel.GUMBEL_TEMPERATURE == pytest.approx(2 / 3)
  assert batch_shaping.GATE_HIDDEN_UNITS == 16
