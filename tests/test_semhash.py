"""Improved SemHash: forward values, the straight-through gradient, modes, dtypes, transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaternet_jax.gating import semhash


def test_saturating_sigmoid_known_values():
  x = jnp.array([-10.0, -np.log(11.0), 0.0, np.log(11.0), 10.0])
  # 1.2*sigmoid(x) - 0.1 is 0 at x = -ln 11 and 1 at x = ln 11; clipped outside.
  np.testing.assert_allclose(semhash.saturating_sigmoid(x), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(
    semhash.saturating_sigmoid(jnp.array([1.0])), [1.2 / (1 + np.exp(-1.0)) - 0.1], rtol=1e-6
  )


def test_eval_is_deterministic_hard_step():
  logits = jnp.array([[-2.0, -1e-3, 0.0, 1e-3, 5.0]])
  gates = semhash.improved_semhash(logits, train=False)
  np.testing.assert_array_equal(gates, [[0.0, 0.0, 0.0, 1.0, 1.0]])
  again = semhash.improved_semhash(logits, train=False)
  np.testing.assert_array_equal(gates, again)
  assert gates.dtype == logits.dtype


def _noisy_and_choice(logits, rng):
  """Re-derives the noise and per-sample choice improved_semhash draws from `rng`."""
  noise_key, choice_key = jax.random.split(rng)
  noisy = logits + jax.random.normal(noise_key, logits.shape, jnp.float32)
  use_alpha = jax.random.bernoulli(choice_key, 0.5, (logits.shape[0],))
  return noisy, use_alpha


def test_train_forward_uses_alpha_or_beta_per_sample():
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 3
  rng = jax.random.key(1)
  gates = semhash.improved_semhash(logits, train=True, rng=rng)
  noisy, use_alpha = _noisy_and_choice(logits, rng)
  expected = np.where(
    np.asarray(use_alpha)[:, None],
    semhash.saturating_sigmoid(noisy),
    (np.asarray(noisy) > 0).astype(np.float32),
  )
  np.testing.assert_allclose(gates, expected, atol=1e-6)
  beta_rows = np.asarray(gates)[~np.asarray(use_alpha)]
  assert set(np.unique(beta_rows)) <= {0.0, 1.0}


def test_gradient_is_saturating_sigmoid_derivative_for_both_paths():
  logits = jnp.linspace(-6.0, 6.0, 40)[None, :].repeat(32, axis=0)
  rng = jax.random.key(7)
  weights = jax.random.normal(jax.random.key(3), logits.shape)
  grad = jax.grad(lambda l: jnp.sum(weights * semhash.improved_semhash(l, train=True, rng=rng)))(
    logits
  )
  noisy, use_alpha = _noisy_and_choice(logits, rng)
  s = jax.nn.sigmoid(noisy)
  raw = 1.2 * s - 0.1
  expected = np.where((raw > 0) & (raw < 1), 1.2 * s * (1 - s), 0.0) * weights
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  use_alpha = np.asarray(use_alpha)
  assert use_alpha.any() and (~use_alpha).any()  # both paths were exercised
  flat = np.asarray(raw >= 1) | np.asarray(raw <= 0)
  assert flat.any() and np.all(np.asarray(grad)[flat] == 0.0)  # zero where sigma' is flat


def test_about_half_the_samples_take_each_path():
  logits = jnp.full((4000, 3), 0.3)
  gates = semhash.improved_semhash(logits, train=True, rng=jax.random.key(0))
  # A sample is on the beta path iff all its gates are exactly 0 or 1 (alpha gates with these
  # logits and N(0,1) noise are almost surely strictly inside (0, 1) for at least one gate).
  binary = np.all((np.asarray(gates) == 0) | (np.asarray(gates) == 1), axis=1)
  assert 0.45 < binary.mean() < 0.55


def test_train_requires_rng():
  with pytest.raises(ValueError):
    semhash.improved_semhash(jnp.zeros((2, 3)), train=True)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_jit_grad_vmap_and_dtypes(dtype):
  logits = jax.random.normal(jax.random.key(0), (8, 16)).astype(dtype)
  rng = jax.random.key(2)
  f = jax.jit(lambda l, r: semhash.improved_semhash(l, train=True, rng=r))
  out = f(logits, rng)
  assert out.dtype == dtype and out.shape == logits.shape
  g = jax.jit(
    jax.grad(
      lambda l: jnp.sum(semhash.improved_semhash(l, train=True, rng=rng).astype(jnp.float32))
    )
  )(logits)
  assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
  keys = jax.random.split(rng, 3)
  batched = jax.vmap(lambda l, r: semhash.improved_semhash(l, train=True, rng=r))(
    jnp.stack([logits] * 3), keys
  )
  assert batched.shape == (3, 8, 16)
  evals = jax.vmap(lambda l: semhash.improved_semhash(l, train=False))(jnp.stack([logits] * 2))
  np.testing.assert_array_equal(evals[0], (logits > 0).astype(dtype))
