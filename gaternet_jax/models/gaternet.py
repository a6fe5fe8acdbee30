"""Whole models: a plain classifier and the GaterNet (gater + backbone).

Both return `(logits, aux)` and keep the backbone's parameters under `backbone`, so a plain run's
checkpoint initialises a GaterNet's backbone without renaming anything.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax import semhash


class Classifier(nn.Module):
  """A backbone on its own (the plain, -Wider and -SE variants and the pre-training stages)."""

  backbone: nn.Module

  def __call__(self, x: jax.Array, *, train: bool, gate_dropout_rate=0.0, gate_threshold=0.0):
    del gate_dropout_rate, gate_threshold  # no gates
    return self.backbone(x, train=train), {}


class GaterNet(nn.Module):
  """Paper Fig. 1: the gater looks at the image, SemHash binarizes, the backbone uses the gates.

  Randomness comes from the Flax rng stream 'gates' (SemHash noise, the alpha/beta choice, gate
  dropout), which the training step derives from its key, so a step is a pure function of
  (state, batch, key). Evaluation mode needs no rng; its gates are 1(g' > gate_threshold), where
  the trained model's threshold is 0 (a higher one switches more filters off: the compute knob).
  """

  backbone: nn.Module
  gater: nn.Module

  def __call__(self, x: jax.Array, *, train: bool, gate_dropout_rate=0.0, gate_threshold=0.0):
    gate_logits = self.gater(x, train=train)
    rng = self.make_rng('gates') if train else None
    if train:
      semhash_rng, dropout_rng = jax.random.split(rng)
      gates = semhash.improved_semhash(gate_logits, train=True, rng=semhash_rng)
      # Scheduled dropout on the gate vector (paper appendix B). A dropped gate is set to 0 and
      # the others are not rescaled, so gates stay in [0, 1] and binary on the beta path.
      keep = jax.random.bernoulli(dropout_rng, 1.0 - gate_dropout_rate, gates.shape)
      gates = gates * keep.astype(gates.dtype)
    else:
      # 1(g' > T) = 1(g' - T > 0): SemHash's evaluation-mode gate at a shifted decision point.
      gates = semhash.improved_semhash(gate_logits - gate_threshold, train=False)
    logits = self.backbone(x, gates=gates, train=train)
    aux = {
      'gates': gates,
      'gate_logits': gate_logits,
      'density': jnp.mean(gates.astype(jnp.float32)),
    }
    return logits, aux
