"""The channel plan of an exported (pruned) GaterNet: which filters of each gated layer remain.

`gaternet export` (export.py) sorts every gated filter by what its gate did on a calibration split:
always off (the filter is removed: its output channel of the gated convolution and its batch-norm
entries), always on (kept, ungated: its gate is no longer produced) or input-dependent (kept and
still gated). A residual unit's output keeps its full width: the kept channels are added to the
shortcut at their original positions, the removed ones are the shortcut alone, which is what the
gated model computed for them (eq. 4 with g_i = 0 gives O_i = 0).

The plan travels in the exported run's config as `model.pruning`: {layer name: {'kept': [...],
'gated': [...]}}, so an export is an ordinary run directory (config + checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PrunedLayer:
  """What remains of one gated layer.

  Attributes:
    kept: the gated convolution's output channels still computed, ascending (indices into the
      original layer).
    gated: positions in `kept` whose gate is still input-dependent, ascending; the other kept
      channels are always on and run ungated.
  """

  kept: tuple[int, ...]
  gated: tuple[int, ...]

  def __post_init__(self):
    if list(self.kept) != sorted(set(self.kept)) or list(self.gated) != sorted(set(self.gated)):
      raise ValueError('kept and gated must be ascending without repeats')
    if self.gated and not 0 <= self.gated[-1] < len(self.kept):
      raise ValueError(f'gated positions {self.gated} fall outside the {len(self.kept)} kept')


Pruning = tuple[tuple[str, PrunedLayer], ...]  # hashable, so it can be a module attribute


def from_config(value: Mapping[str, Any] | None) -> Pruning | None:
  """`config.model.pruning` ({name: {'kept', 'gated'}}) as a module attribute, or None."""
  if not value:
    return None
  return tuple(
    (name, PrunedLayer(tuple(int(i) for i in v['kept']), tuple(int(i) for i in v['gated'])))
    for name, v in value.items()
  )


def to_config(pruning: Pruning) -> dict[str, dict[str, list[int]]]:
  """The JSON form stored as `config.model.pruning`."""
  return {name: {'kept': list(p.kept), 'gated': list(p.gated)} for name, p in pruning}


def gate_width(pruned: PrunedLayer | None, filters: int) -> int:
  """Entries of the gate vector a layer of `filters` filters consumes under its plan."""
  return filters if pruned is None else len(pruned.gated)


def every_kept_gated(pruned: PrunedLayer | None) -> bool:
  """Whether every filter a layer still computes is gated (always so without a plan)."""
  return pruned is None or len(pruned.gated) == len(pruned.kept)


def apply_kept_gates(y: jax.Array, gate: jax.Array | None, pruned: PrunedLayer) -> jax.Array:
  """Eq. 4 on the kept channels: the input-dependent ones times their gate, the others times 1.

  Args:
    y: the pruned gated layer's output, (batch, H, W, len(kept)).
    gate: (batch, len(gated)), the layer's input-dependent gates (None when there are none).
    pruned: the layer's plan.
  """
  if not pruned.gated:
    return y
  if gate is None or gate.shape[-1] != len(pruned.gated):
    raise ValueError(
      f'the layer keeps {len(pruned.gated)} gates; got {None if gate is None else gate.shape}'
    )
  if len(pruned.gated) == len(pruned.kept):
    full = gate
  else:
    # Column j of [gate, 1] for each kept channel: its gate if gated, else the constant 1.
    index = np.full(len(pruned.kept), len(pruned.gated))
    index[list(pruned.gated)] = np.arange(len(pruned.gated))
    full = jnp.concatenate([gate, jnp.ones_like(gate[:, :1])], axis=-1)[:, index]
  return y * full[:, None, None, :].astype(y.dtype)


def add_to_shortcut(shortcut: jax.Array, y: jax.Array, pruned: PrunedLayer | None) -> jax.Array:
  """The residual addition with the kept channels at their original positions.

  A removed channel's output is the shortcut alone, exactly what the gated model computed with
  its gate at 0. The kept channels are placed by a product with a 0/1 selection matrix (k, C):
  every output is one y times 1 plus zeros, so it is exact (HIGHEST precision: no bf16 or TF32
  passes on TPU/GPU). On this CPU it measured 1.08x the images/s of the scatter
  `shortcut.at[..., kept].add(y)` for a whole exported ResNet-20 (docs/results.md, export).
  """
  if pruned is None or len(pruned.kept) == shortcut.shape[-1]:
    return shortcut + y
  if not pruned.kept:
    return shortcut
  select = jax.nn.one_hot(np.asarray(pruned.kept), shortcut.shape[-1], dtype=y.dtype)  # (k, C)
  placed = jnp.einsum('...k,kc->...c', y, select, precision=jax.lax.Precision.HIGHEST)
  return shortcut + placed.astype(shortcut.dtype)
