"""Losses: cross-entropy, the gate regularisers, and `objective`, the one place the training loss
is assembled from the config.

The paper's loss (section 3.2.2) is

    L = -log P(y | x, theta) + lambda * ||G(x)||_1 / c

A regulariser is a function `(aux, config) -> scalar` of the model's auxiliary outputs (the gates);
`REGULARIZERS` names them and `active_regularizers(config)` chooses them, so a new gate loss is a
function and one line here, never an edit of the training step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

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
  receives no gradient from it; `tests/test_models.py::
  test_sparsity_term_gives_backbone_exactly_zero_gradient` checks exactly that.
  """
  gates = gates.astype(jnp.float32)
  return weight * jnp.mean(jnp.sum(jnp.abs(gates), axis=-1) / gates.shape[-1])


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per example 1.0 if the label is among the k highest logits, else 0.0."""
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


Regularizer = Callable[[Mapping[str, jax.Array], Any], jax.Array]


def _l1_term(aux: Mapping[str, jax.Array], config) -> jax.Array:
  return gate_l1(aux['gates'], config.gater.l1_weight)


# name -> (aux, config) -> weighted scalar term. Each is added to the cross-entropy.
REGULARIZERS: dict[str, Regularizer] = {'l1': _l1_term}


def active_regularizers(config) -> tuple[str, ...]:
  """The regularisers a config trains with: the paper's L1 term for a gated model, none else."""
  return ('l1',) if config.model.gated else ()


def objective(
  logits: jax.Array, labels: jax.Array, aux: Mapping[str, jax.Array], config
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss: cross-entropy plus every active regulariser.

  Args:
    logits: (batch, classes).
    labels: (batch,) integer labels.
    aux: the model's auxiliary outputs (`gates` for a GaterNet; empty for a plain model).
    config: the run's config (chooses and weights the regularisers).

  Returns:
    (loss, terms): the scalar loss, and `cross_entropy`, `sparsity` (the sum of the
    regularisers) and each regulariser by name, for logging.
  """
  ce = cross_entropy(logits, labels)
  terms = {'cross_entropy': ce}
  sparsity = jnp.zeros((), jnp.float32)
  if 'gates' in aux:
    for name in active_regularizers(config):
      terms[name] = REGULARIZERS[name](aux, config)
      sparsity = sparsity + terms[name]
  terms['sparsity'] = sparsity
  return ce + sparsity, terms
