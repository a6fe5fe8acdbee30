"""Losses: cross-entropy, the gate regularisers, and `objective`, the one place the training loss
is assembled from the config.

GaterNet's loss (section 3.2.2) is

    L = -log P(y | x, theta) + lambda * ||G(x)||_1 / c                       ('l1')

and Batch-Shaping's (ICLR 2020)

    L = -log P(y | x, theta) + gamma_BaS(t) L_BaS(P(g on | x)) + gamma_L0(t) L_0   ('batch_shaping', 'l0')

with P(g on | x) the binarizer's on-probability (gating/binarizers.py) and the weights' schedules
of gating/batch_shaping.py. `config.gating.losses` chooses any of the three terms for any gating
method. A regulariser is a function `(aux, config, progress) -> scalar` of the model's auxiliary
outputs (the gates and their logits) and the training progress; `REGULARIZERS` names them, so a
new gate loss is a function and one line here, never an edit of the training step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gaternet_jax import configs, legacy
from gaternet_jax.gating import batch_shaping, binarizers


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


class Progress(NamedTuple):
  """Where training is: `step` (may be traced) of `total_steps` (a Python int)."""

  step: Any
  total_steps: int

  def at(self, fraction: float) -> int:
    """The step at `fraction` of training (a Python int)."""
    return round(fraction * self.total_steps)


Regularizer = Callable[..., jax.Array]  # (aux, config, progress[, weight=]) -> weighted term

# The config field that weights each built-in regulariser. A population trained as one program
# (`training/population.py`) passes each member's weight as a traced value (`objective`'s
# `weights`) instead of the Python number in the shared config.
WEIGHT_FIELDS = {
  'l1': 'gating.l1_weight',
  'l0': 'gating.l0_weight',
  'batch_shaping': 'gating.batch_shaping_weight',
}


def _on_probability(aux: Mapping[str, jax.Array], config) -> jax.Array:
  return binarizers.on_probability(aux['gate_logits'], configs.gating_of(config).binarizer)


def _l1_term(aux: Mapping[str, jax.Array], config, progress: Progress, weight=None) -> jax.Array:
  del progress  # constant weight
  weight = configs.gating_of(config).l1_weight if weight is None else weight
  return gate_l1(aux['gates'], weight)


def _l0_term(aux: Mapping[str, jax.Array], config, progress: Progress, weight=None) -> jax.Array:
  g = configs.gating_of(config)
  start = progress.at(g.l0_start)
  weight = batch_shaping.l0_weight(
    progress.step,
    final_weight=g.l0_weight if weight is None else weight,
    start_step=start,
    ramp_end_step=max(start, progress.at(g.l0_ramp_end)),  # equal: the full weight at `start`
  )
  return weight * jnp.mean(_on_probability(aux, config))


def _batch_shaping_term(
  aux: Mapping[str, jax.Array], config, progress: Progress, weight=None
) -> jax.Array:
  g = configs.gating_of(config)
  weight = batch_shaping.batch_shaping_weight(
    progress.step,
    end_step=max(1, progress.at(g.batch_shaping_end)),
    initial_weight=g.batch_shaping_weight if weight is None else weight,
  )
  # On the GLOBAL batch: under jit with the batch sharded, the sort is a global sort.
  per_gate = batch_shaping.batch_shaping_per_gate(
    _on_probability(aux, config), g.prior_a, g.prior_b
  )
  reduction = legacy.field(config, 'gating.batch_shaping_reduction')
  return weight * (jnp.sum(per_gate) if reduction == 'sum' else jnp.mean(per_gate))


# name -> (aux, config, progress) -> weighted scalar term. Each is added to the cross-entropy.
REGULARIZERS: dict[str, Regularizer] = {
  'l1': _l1_term,
  'l0': _l0_term,
  'batch_shaping': _batch_shaping_term,
}


def active_regularizers(config) -> tuple[str, ...]:
  """The regularisers a config trains with: `gating.losses` for a gated model, none else."""
  return configs.gate_losses(config)


def objective(
  logits: jax.Array,
  labels: jax.Array,
  aux: Mapping[str, jax.Array],
  config,
  progress: Progress = Progress(0, 1),
  weights: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss: cross-entropy plus every active regulariser.

  Args:
    logits: (batch, classes).
    labels: (batch,) integer labels.
    aux: the model's auxiliary outputs (`gates` and `gate_logits` for a gated model; empty for a
      plain model).
    config: the run's config (chooses and weights the regularisers).
    progress: the training step and the run's total steps (the loss weights' schedules).
    weights: values that replace the config's weight fields (`WEIGHT_FIELDS`' values as keys),
      e.g. one population member's traced weights; absent fields keep the config's.

  Returns:
    (loss, terms): the scalar loss, and `cross_entropy`, `sparsity` (the sum of the
    regularisers) and each regulariser by name, for logging.
  """
  ce = cross_entropy(logits, labels)
  terms = {'cross_entropy': ce}
  sparsity = jnp.zeros((), jnp.float32)
  if 'gates' in aux:
    for name in active_regularizers(config):
      field = WEIGHT_FIELDS.get(name)
      if weights and field in weights:
        terms[name] = REGULARIZERS[name](aux, config, progress, weight=weights[field])
      else:
        terms[name] = REGULARIZERS[name](aux, config, progress)
      sparsity = sparsity + terms[name]
  terms['sparsity'] = sparsity
  return ce + sparsity, terms
