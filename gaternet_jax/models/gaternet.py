"""Whole models: a plain classifier, the GaterNet (gater + backbone), and a locally gated
backbone (Batch-Shaping's gating modules inside the units).

All return `(logits, aux)` and keep the backbone's parameters under `backbone`, so a plain run's
checkpoint initialises a gated model's backbone without renaming anything. The gated models' aux
is the same: `gates` and `gate_logits`, (batch, c) in gate-layout order, and `density`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gating import binarizers, gumbel
from gaternet_jax.gating.batch_shaping import GATE_HIDDEN_UNITS
from gaternet_jax.gating.local import LocalGates


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
  binarizer: str = 'semhash'  # the paper's; 'gumbel' is Batch-Shaping's
  temperature: float = gumbel.GUMBEL_TEMPERATURE  # gumbel only

  def __call__(self, x: jax.Array, *, train: bool, gate_dropout_rate=0.0, gate_threshold=0.0):
    gate_logits = self.gater(x, train=train)
    # Training: noisy straight-through gates, then scheduled dropout on the gate vector (paper
    # appendix B); evaluation: 1(g' > gate_threshold).
    gates = binarizers.sample_gates(
      gate_logits,
      self.binarizer,
      train=train,
      key=self.make_rng('gates') if train else None,
      temperature=self.temperature,
      dropout_rate=gate_dropout_rate,
      threshold=gate_threshold,
    )
    logits = self.backbone(x, gates=gates, train=train)
    return logits, gate_aux(gates, gate_logits)


class LocallyGated(nn.Module):
  """A backbone whose units gate their own first convolution (Batch-Shaping, ICLR 2020).

  No global gater: each unit's gating module looks at the unit's input (gating/local.py). The
  gating modules' rng comes from the stream 'gates' like the GaterNet's; evaluation gates are
  1(alpha > gate_threshold).

  Attributes:
    backbone: a backbone built with `gate_placement='first'`.
    binarizer: 'gumbel' (the paper's) or 'semhash'.
    temperature: the Gumbel-sigmoid temperature.
    hidden: the gating modules' FC1 width.
    init_bias: the gating modules' initial FC2 bias (every gate starts mostly on).
  """

  backbone: nn.Module
  binarizer: str = 'gumbel'
  temperature: float = gumbel.GUMBEL_TEMPERATURE
  hidden: int = GATE_HIDDEN_UNITS
  init_bias: float = 1.0

  def __call__(self, x: jax.Array, *, train: bool, gate_dropout_rate=0.0, gate_threshold=0.0):
    source = LocalGates(
      train=train,
      binarizer=self.binarizer,
      temperature=self.temperature,
      hidden=self.hidden,
      init_bias=self.init_bias,
      dtype=self.backbone.dtype,
      dropout_rate=gate_dropout_rate,
      threshold=gate_threshold,
    )
    logits = self.backbone(x, gates=source, train=train)
    gate_logits, gates = source.collected()
    return logits, gate_aux(gates, gate_logits)


def gate_aux(gates: jax.Array, gate_logits: jax.Array) -> dict[str, jax.Array]:
  """A gated model's auxiliary outputs (the same for every gating method)."""
  return {
    'gates': gates,
    'gate_logits': gate_logits,
    'density': jnp.mean(gates.astype(jnp.float32)),
  }
