"""Gating: binarizers that turn real-valued gate logits into {0, 1} channel gates, the regularisers
that shape them, and Batch-Shaping's local gate placement (GaterNet's global gater is
`gaternet_jax.models.gater`).

`gumbel`: the Gumbel-sigmoid straight-through binarizer (Batch-Shaping's gating modules);
Improved SemHash, GaterNet's binarizer, is `gaternet_jax.gating.semhash`.
`binarizers`: either binarizer behind one interface (`sample_gates`, `on_probability`).
`batch_shaping`: the batch-shaping and L0 losses of Bejnordi et al. (ICLR 2020), their weight
schedules and the paper's hyper-parameters.
`local`: the per-unit gating modules of Batch-Shaping and the `LocalGates` source the units call.
"""

from gaternet_jax.gating import batch_shaping, gumbel
from gaternet_jax.gating.batch_shaping import (
  batch_shaping_loss,
  batch_shaping_per_gate,
  batch_shaping_weight,
  beta_cdf,
  l0_loss,
  l0_weight,
)
from gaternet_jax.gating.gumbel import gate_on_probability, gumbel_sigmoid_gate

__all__ = [
  'batch_shaping',
  'batch_shaping_loss',
  'batch_shaping_per_gate',
  'batch_shaping_weight',
  'beta_cdf',
  'gate_on_probability',
  'gumbel',
  'gumbel_sigmoid_gate',
  'l0_loss',
  'l0_weight',
]
