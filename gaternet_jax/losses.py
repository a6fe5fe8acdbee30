"""Losses: cross-entropy and the gate sparsity term of section 3.2.2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy -log P(y|x) over the (masked-in) examples, in float32."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if mask is None:
    return jnp.mean(per_example)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def gate_l1(gates: jax.Array, weight: float | jax.Array) -> jax.Array:
  """lambda * ||G(x)||_1 / c, averaged over the batch.

  The gates are non-negative, so the L1 norm is their sum. The term depends on the gater's
  parameters only (the gates are computed from the image by the gater alone), so the backbone
  receives no gradient from it; tests/test_losses.py checks exactly that.
  """
  gates = gates.astype(jnp.float32)
  return weight * jnp.mean(jnp.sum(jnp.abs(gates), axis=-1) / gates.shape[-1])


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per example 1.0 if the label is among the k highest logits, else 0.0."""
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
