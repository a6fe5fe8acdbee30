"""The two binarizers a gated model can use, behind one interface.

`semhash`: GaterNet's Improved SemHash (`gaternet_jax.gating.semhash`): noise N(0, 1) on the logit g',
half the samples take the saturating sigmoid, half the hard step; the step's gradient is the
sigmoid's. `gumbel`: Batch-Shaping's Gumbel-sigmoid straight-through gate
(`gaternet_jax.gating.gumbel`): logistic noise, a hard forward, the relaxed sigmoid's gradient.

Both evaluate to the deterministic gate 1(logit > T), T = 0 for the trained model (the gate
threshold moves it: the compute knob of `gaternet tradeoff`). Both define the probability that a
gate is on under their training noise, which the L0 and batch-shaping losses act on
(`on_probability`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaternet_jax.gating import gumbel, semhash

BINARIZERS = ('semhash', 'gumbel')


def check_binarizer(name: str) -> str:
  if name not in BINARIZERS:
    raise ValueError(f'unknown gate binarizer {name!r}; choose one of {", ".join(BINARIZERS)}')
  return name


def sample_gates(
  logits: jax.Array,
  binarizer: str,
  *,
  train: bool,
  key: jax.Array | None = None,
  temperature: float = gumbel.GUMBEL_TEMPERATURE,
  dropout_rate: float | jax.Array = 0.0,
  threshold: float | jax.Array = 0.0,
) -> jax.Array:
  """Gates from gate logits, shape and dtype of `logits` (batch first).

  Training (`train`, needs `key`): the binarizer's noisy, straight-through gates, then scheduled
  dropout on the gates (GaterNet appendix B): each gate is set to 0 with probability
  `dropout_rate`, the others are not rescaled, so gates stay binary (or in [0, 1] on SemHash's
  sigmoid path). Evaluation: 1(logits - threshold > 0), no noise, no dropout.
  """
  check_binarizer(binarizer)
  if not train:
    # 1(g' > T) = 1(g' - T > 0): both binarizers' evaluation gate at a shifted decision point.
    return semhash.hard_gate(logits - threshold)
  if key is None:
    raise ValueError('sample_gates(train=True) needs a PRNG key')
  noise_key, dropout_key = jax.random.split(key)
  if binarizer == 'semhash':
    gates = semhash.improved_semhash(logits, train=True, rng=noise_key)
  else:
    gates = gumbel.gumbel_sigmoid_gate(logits, noise_key, temperature=temperature, train=True)
  if isinstance(dropout_rate, (int, float)) and dropout_rate == 0:
    return gates  # what a mask of P(keep) = 1 gives, without drawing it
  keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, gates.shape)
  return gates * keep.astype(gates.dtype)


def on_probability(logits: jax.Array, binarizer: str) -> jax.Array:
  """P(gate on | x) under the binarizer's training noise, float32: what L0 and batch-shaping see.

  gumbel: the gate is 1(alpha + L > 0), L ~ Logistic(0, 1), so P = sigmoid(alpha).
  semhash: the hard gate is 1(g' + eps > 0), eps ~ N(0, 1), so P = Phi(g') (the normal CDF);
  it is also the expected value of the sigmoid path up to the saturating sigmoid's shape.
  """
  check_binarizer(binarizer)
  if binarizer == 'gumbel':
    return gumbel.gate_on_probability(logits)
  return jax.scipy.stats.norm.cdf(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
