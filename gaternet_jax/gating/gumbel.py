"""Gumbel-sigmoid straight-through gates: the binarizer of Batch-Shaping's gating modules.

Bejnordi, Blankevoort & Welling, "Batch-Shaping for Learning Conditional Channel Gated Networks"
(ICLR 2020), sample each channel's gate from the logit alpha that the gating module outputs with
the binary case of the Gumbel-softmax trick (Jang et al. 2017; Maddison et al. 2017):

    G1, G2 ~ Gumbel(0, 1) i.i.d.   =>   L = G1 - G2 ~ Logistic(0, 1)
    relaxed = sigmoid((alpha + L) / tau)
    gate    = 1(relaxed > 0.5) = 1(alpha + L > 0)                  forward: exactly binary
    d gate / d alpha := d relaxed / d alpha = relaxed (1 - relaxed) / tau    backward

The backward pass is the straight-through estimator: the hard gate is used in the forward pass,
the relaxed sigmoid's derivative in the backward pass. The gate is on with probability

    P(gate = 1) = P(L > -alpha) = 1 - sigmoid(-alpha) = sigmoid(alpha),

so alpha is the gate's log-odds, and `gate_on_probability` is what the L0 term penalises.
Evaluation is deterministic, no noise: gate = 1(alpha > 0), the more probable value.

The functions are pure and carry no state, like `gaternet_jax.gating.semhash`; the straight-through
gradient is a `jax.custom_vjp`, so the forward value is exactly 0 or 1 (the `stop_gradient`
trick, relaxed + stop_gradient(hard - relaxed), can round 1.0 to a neighbouring float).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The Gumbel-sigmoid temperature tau of the gating module (paper Sec. 3, gating module; 2/3 is
# the value Maddison et al. 2017 recommend). UNVERIFIED: taken from two public reimplementations
# that agree, not from the paper's text (see PROVENANCE in gaternet_jax/gating/batch_shaping.py).
GUMBEL_TEMPERATURE = 2.0 / 3.0


def logistic_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """L ~ Logistic(0, 1) in float32: in distribution the difference of two Gumbel(0, 1) samples.

  `jax.random.logistic` draws log(U / (1 - U)) from one uniform U, which has exactly the law of
  G1 - G2 and costs one random number instead of two. Always float32, so bfloat16 logits do not
  get coarse noise.
  """
  return jax.random.logistic(key, shape, jnp.float32)


def relaxed_gate(logits: jax.Array, noise: jax.Array, temperature: float) -> jax.Array:
  """The relaxed (continuous) gate sigmoid((alpha + L) / tau), in float32."""
  return jax.nn.sigmoid((logits.astype(jnp.float32) + noise) / temperature)


def hard_gate(logits: jax.Array) -> jax.Array:
  """1(alpha > 0) in alpha's dtype: the evaluation gate (and the training gate at zero noise)."""
  return (logits > 0).astype(logits.dtype)


def gate_on_probability(logits: jax.Array) -> jax.Array:
  """P(gate = 1) = sigmoid(alpha), in float32 (float64 for float64 logits).

  This is the noise-free, pre-binarisation gate value: the L0 term penalises its mean, and it is
  the quantity the batch-shaping loss shapes (see `batch_shaping.batch_shaping_loss`).
  """
  return jax.nn.sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _straight_through(logits: jax.Array, noise: jax.Array, temperature: float) -> jax.Array:
  # 1(relaxed > 0.5) written on the pre-sigmoid value: sigmoid(y) > 0.5 <=> y > 0 exactly, and
  # comparing y avoids sigmoid rounding to 0.5 for |y| below float precision. tau > 0 does not
  # change the sign, so it does not enter the forward value.
  return (logits.astype(jnp.float32) + noise > 0).astype(logits.dtype)


def _straight_through_fwd(logits, noise, temperature):
  return _straight_through(logits, noise, temperature), relaxed_gate(logits, noise, temperature)


def _straight_through_bwd(temperature, relaxed, cotangent):
  # d relaxed / d alpha = relaxed (1 - relaxed) / tau, in float32, then cast back to the
  # cotangent's (= the logits') dtype. The noise enters the relaxed gate exactly as alpha does,
  # so it gets the same derivative (nothing upstream of the noise is differentiated).
  grad = cotangent.astype(jnp.float32) * relaxed * (1.0 - relaxed) / temperature
  return grad.astype(cotangent.dtype), grad


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def gumbel_sigmoid_gate(
  logits: jax.Array,
  key: jax.Array | None,
  *,
  temperature: float = GUMBEL_TEMPERATURE,
  train: bool,
) -> jax.Array:
  """Binary gates from gate logits alpha.

  Args:
    logits: alpha, any shape (typically (batch, channels)), float32 or bfloat16.
    key: a PRNG key; required when `train`, ignored otherwise. One independent logistic sample is
      drawn per element.
    temperature: tau > 0, a Python number (it shapes the gradient only, never the forward value).
    train: training mode (noise, hard forward, straight-through backward) or evaluation mode
      (deterministic 1(alpha > 0), no noise, zero gradient).

  Returns:
    Gates in {0, 1}, of the shape and dtype of `logits`.
  """
  if not train:
    return hard_gate(logits)
  if key is None:
    raise ValueError('gumbel_sigmoid_gate(train=True) needs a PRNG key.')
  temperature = float(temperature)
  if not temperature > 0:
    raise ValueError(f'the Gumbel-sigmoid temperature must be positive, got {temperature}')
  noise = logistic_noise(key, logits.shape)
  return _straight_through(logits, noise, temperature)
