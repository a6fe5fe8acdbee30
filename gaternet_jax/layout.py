"""Gate layouts: which layers of a backbone are gated, known from its configuration alone."""

from __future__ import annotations

from typing import NamedTuple, Sequence


class GatedLayer(NamedTuple):
  """One gated layer of a backbone.

  Attributes:
    name: a stable, human-readable name, e.g. ``stage2/unit3``.
    filters: how many output channels (filters) of this layer the gate vector controls.
    macs_per_filter: multiply-accumulates one filter of this layer costs per image (kernel area x
      input channels x output positions); what switching the filter off saves.
  """

  name: str
  filters: int
  macs_per_filter: int


def total_filters(layout: Sequence[GatedLayer]) -> int:
  """`c` of the paper: the length of the gate vector."""
  return sum(layer.filters for layer in layout)


def layer_offsets(layout: Sequence[GatedLayer]) -> list[int]:
  """Start index of each layer's slice in the gate vector (len(layout) + 1 entries)."""
  offsets = [0]
  for layer in layout:
    offsets.append(offsets[-1] + layer.filters)
  return offsets
