"""Local gating (Batch-Shaping, Bejnordi et al., ICLR 2020): a small gating module per residual
unit decides, from the unit's input, which output channels of the unit's first convolution are
computed.

    alpha = FC2(ReLU(BN(FC1(GAP(x)))))     one logit per channel of the first convolution
    g     = binarize(alpha)                 Gumbel-sigmoid straight-through (or SemHash)
    y     = phi(BN(conv1(x))) * g           then the rest of the unit as usual

Gating the first convolution saves its gated filters and, since an off channel is zero, the
matching input channels of the second convolution (the layout's per-filter cost counts both).

How the gates get out of the backbone: the top-level model (`models.gaternet.LocallyGated`)
passes a `LocalGates` to the backbone in place of the gate vector; each unit calls
`LocalGates.gate(x, channels)` inside its own `__call__`, so the gating module is the unit's
submodule (its parameters live at `<unit>/gate`) and draws its noise from the unit's own fold of
the 'gates' rng stream; `LocalGates` keeps each unit's logits and gates, in unit order, which is
the backbone's gate-layout order, so the model's auxiliary outputs have the same
`(batch, c)` shape and meaning as a GaterNet's and every gate consumer (evaluation counts,
analysis, tradeoff) reads them unchanged. A `LocalGates` lives for one model call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gating import binarizers, gumbel
from gaternet_jax.gating.batch_shaping import GATE_HIDDEN_UNITS

# The name of every gating module inside its unit (describe counts parameters and MACs under it
# as the model's gating cost).
MODULE_NAME = 'gate'


class GatingModule(nn.Module):
  """Batch-Shaping's gating module: logits alpha from the unit input, then binary gates.

  Attributes:
    channels: gated channels (the first convolution's filters).
    hidden: FC1's width (16 in the paper's CIFAR models).
    binarizer: 'gumbel' (the paper) or 'semhash'.
    temperature: the Gumbel-sigmoid temperature (gradient only).
    init_bias: FC2's initial bias: P(on) = sigmoid(init_bias) at the start, every gate mostly on.
  """

  channels: int
  hidden: int = GATE_HIDDEN_UNITS
  binarizer: str = 'gumbel'
  temperature: float = gumbel.GUMBEL_TEMPERATURE
  init_bias: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, dropout_rate=0.0, threshold=0.0):
    s = jnp.mean(x, axis=(1, 2))  # global average pooling: (batch, in_channels)
    h = nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(s)
    h = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name='bn',
    )(h)
    logits = nn.Dense(
      self.channels,
      dtype=self.dtype,
      bias_init=nn.initializers.constant(self.init_bias),
      name='fc2',
    )(nn.relu(h)).astype(jnp.float32)
    gates = binarizers.sample_gates(
      logits,
      self.binarizer,
      train=train,
      key=self.make_rng('gates') if train else None,
      temperature=self.temperature,
      dropout_rate=dropout_rate,
      threshold=threshold,
    )
    return logits, gates


@dataclasses.dataclass
class LocalGates:
  """The gate source of a locally gated backbone for one forward pass (see the module doc).

  Attributes:
    train: training mode (noisy gates) or evaluation (1(alpha > threshold)).
    binarizer, temperature, hidden, init_bias, dtype: the gating modules' settings.
    dropout_rate: scheduled dropout on the gates (training only).
    threshold: the evaluation gates' decision point (0: the trained model).
    logits, gates: filled by the units, one (batch, channels) array each, in unit order.
  """

  train: bool
  binarizer: str = 'gumbel'
  temperature: float = gumbel.GUMBEL_TEMPERATURE
  hidden: int = GATE_HIDDEN_UNITS
  init_bias: float = 1.0
  dtype: Any = jnp.float32
  dropout_rate: Any = 0.0
  threshold: Any = 0.0
  logits: list = dataclasses.field(default_factory=list)
  gates: list = dataclasses.field(default_factory=list)

  def gate(self, x: jax.Array, channels: int) -> jax.Array:
    """The gates of the calling unit's first convolution, (batch, channels), from its input x.

    Must be called inside a unit's `__call__`: the gating module binds to that unit.
    """
    module = GatingModule(
      channels,
      hidden=self.hidden,
      binarizer=self.binarizer,
      temperature=self.temperature,
      init_bias=self.init_bias,
      dtype=self.dtype,
      name=MODULE_NAME,
    )
    logits, gates = module(
      x, train=self.train, dropout_rate=self.dropout_rate, threshold=self.threshold
    )
    self.logits.append(logits)
    self.gates.append(gates)
    return gates

  def collected(self) -> tuple[jax.Array, jax.Array]:
    """(logits, gates), each (batch, c): every unit's, concatenated in layout order."""
    if not self.gates:
      raise ValueError('the backbone called no gating module: it does not support local gating')
    return jnp.concatenate(self.logits, axis=-1), jnp.concatenate(self.gates, axis=-1)
