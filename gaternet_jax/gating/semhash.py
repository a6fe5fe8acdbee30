"""Improved SemHash (Kaiser & Bengio 2018), as GaterNet section 3.2.2 uses it.

Training: noise eps ~ N(0, 1) is added to the real-valued gate logits g', giving g'_e. Two gate
vectors are computed from g'_e: the saturating sigmoid g_a = max(0, min(1, 1.2 sigmoid(g'_e) - 0.1))
and the hard step g_b = 1(g'_e > 0). A random half of the *samples* (one coin per sample, as in
tensor2tensor's `discretization.py`) use g_a, the rest g_b. The gradient of g_b with respect to g'_e
is defined to be the gradient of g_a (straight-through), written as a `jax.custom_vjp`.

Evaluation and inference: no noise, always g_b.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def saturating_sigmoid(x: jax.Array) -> jax.Array:
  """sigma'(x) = max(0, min(1, 1.2 * sigmoid(x) - 0.1)), in x's dtype."""
  return jnp.clip(1.2 * jax.nn.sigmoid(x) - 0.1, 0.0, 1.0)


def saturating_sigmoid_grad(x: jax.Array) -> jax.Array:
  """d sigma'(x) / dx: 1.2 sigmoid(x) (1 - sigmoid(x)) where sigma' is not clipped, else 0."""
  s = jax.nn.sigmoid(x)
  unclipped = jnp.logical_and(1.2 * s - 0.1 > 0.0, 1.2 * s - 0.1 < 1.0)
  return jnp.where(unclipped, 1.2 * s * (1.0 - s), 0.0)


def hard_gate(x: jax.Array) -> jax.Array:
  """g_b = 1(x > 0), in x's dtype."""
  return (x > 0).astype(x.dtype)


@jax.custom_vjp
def _mixed_gate(noisy: jax.Array, use_alpha: jax.Array) -> jax.Array:
  """Per sample: g_a where `use_alpha` else g_b; gradient of g_a for both."""
  return jnp.where(use_alpha, saturating_sigmoid(noisy), hard_gate(noisy))


def _mixed_gate_fwd(noisy, use_alpha):
  return _mixed_gate(noisy, use_alpha), noisy


def _mixed_gate_bwd(noisy, cotangent):
  # Computed in float32 so bfloat16 logits get an accurate derivative, then cast back.
  grad = saturating_sigmoid_grad(noisy.astype(jnp.float32)).astype(noisy.dtype)
  return cotangent * grad, None  # the alpha/beta choice is not differentiable


_mixed_gate.defvjp(_mixed_gate_fwd, _mixed_gate_bwd)


def improved_semhash(logits: jax.Array, *, train: bool, rng: jax.Array | None = None) -> jax.Array:
  """Binary gates from real-valued gate logits.

  Args:
    logits: g' of shape (batch, ...), float32 or bfloat16. The first axis indexes samples: the
      alpha/beta choice is made once per sample.
    train: training mode (noise, mixed alpha/beta, straight-through gradient) or evaluation mode
      (deterministic hard gates).
    rng: a PRNG key; required when `train`.

  Returns:
    Gates of the same shape and dtype as `logits`: in {0, 1} in evaluation, in [0, 1] in training
    (exactly binary for the samples on the beta path).
  """
  if not train:
    return hard_gate(logits)
  if rng is None:
    raise ValueError('improved_semhash(train=True) needs an rng key.')
  noise_key, choice_key = jax.random.split(rng)
  noise = jax.random.normal(noise_key, logits.shape, jnp.float32).astype(logits.dtype)
  use_alpha = jax.random.bernoulli(choice_key, 0.5, (logits.shape[0],))
  use_alpha = use_alpha.reshape((-1,) + (1,) * (logits.ndim - 1))
  return _mixed_gate(logits + noise, use_alpha)
