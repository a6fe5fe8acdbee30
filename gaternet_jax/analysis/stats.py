"""Input validation and every statistic of the gate analysis; pure numpy.

Inputs everywhere are ``gates``, an ``(n, c)`` array of 0/1 values (bool preferred, any integer or
float array holding only 0 and 1 accepted), ``labels``, an ``(n,)`` integer array, and ``layout``,
the backbone's ordered gated layers (`GatedLayer`), whose slices concatenate to the gate vector.
The underscore-prefixed validation helpers are private to the package, not to this file: the
package's other files validate their inputs with them too.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from gaternet_jax import errors
from gaternet_jax import layout as layout_lib

# The ordered gated layers of a backbone; their slices concatenate to the gate vector.
Layout = Sequence['layout_lib.GatedLayer']


# ---------------------------------------------------------------------------------------------
# Input validation.


def _as_bool_gates(gates: np.ndarray, layout: Layout | None = None) -> np.ndarray:
  """Returns `gates` as a 2-D bool array, checking it holds only 0/1 and matches `layout`."""
  gates = np.asarray(gates)
  if gates.ndim != 2:
    raise errors.UserError(f'gates must be a 2-D (examples, gates) array, got shape {gates.shape}')
  if gates.shape[0] == 0:
    raise errors.UserError('gates holds no examples; there is nothing to analyse')
  if gates.dtype != np.bool_:
    # Binary gates are the paper's premise; anything else (e.g. soft gates saved from training
    # mode) would silently skew every count below, so refuse it.
    if np.issubdtype(gates.dtype, np.integer):
      # min/max make no (n, c) temporaries, which matters at 10,000 x 7,200.
      binary = gates.min() >= 0 and gates.max() <= 1
    elif np.issubdtype(gates.dtype, np.floating):
      binary = bool(np.all((gates == 0) | (gates == 1)))
    else:
      raise errors.UserError(f'gates must be bool or 0/1 numbers, got dtype {gates.dtype}')
    if not binary:
      raise errors.UserError('gates must hold only 0 and 1 (evaluation-mode binary gates)')
    # 0/1 bytes already are valid bools, so uint8 (the usual storage type) needs no copy.
    gates = gates.view(np.bool_) if gates.dtype.itemsize == 1 else gates != 0
  if layout is not None:
    _check_layout(layout)
    if gates.shape[1] != _offsets(layout)[-1]:
      raise errors.UserError(
        f'gates have {gates.shape[1]} columns but the layout gates {_offsets(layout)[-1]} filters'
      )
  return gates


def _offsets(layout: Layout) -> list[int]:
  """Start of each layer's slice of the gate vector, then c (len(layout) + 1 entries)."""
  return layout_lib.layer_offsets(layout)


def _check_layout(layout: Layout) -> None:
  if not layout:
    raise errors.UserError('the layout has no gated layers')
  for layer in layout:
    if int(layer.filters) < 1:
      raise errors.UserError(
        f'gated layer {layer.name!r} has {layer.filters} filters; need at least 1'
      )
    if int(layer.macs_per_filter) < 0:
      raise errors.UserError(f'gated layer {layer.name!r} has negative macs_per_filter')


def _as_labels(labels: np.ndarray, n: int) -> np.ndarray:
  """Returns `labels` as a 1-D int64 array of length `n` with non-negative values."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != n:
    raise errors.UserError(f'labels must have shape ({n},) to match the gates, got {labels.shape}')
  if labels.dtype.kind not in 'iub':
    if labels.dtype.kind != 'f' or not np.all(labels == np.round(labels)):
      raise errors.UserError(f'labels must be integers, got dtype {labels.dtype}')
  labels = labels.astype(np.int64)
  if labels.size and labels.min() < 0:
    raise errors.UserError('labels must be non-negative class indices')
  return labels


def _layer_sums(values: np.ndarray, layout: Layout) -> np.ndarray:
  """Sums `values` (bool or int, gates on the last axis) over each layer's slice, as int64."""
  values = values.view(np.uint8) if values.dtype == np.bool_ else values
  return np.add.reduceat(values, _offsets(layout)[:-1], axis=-1, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Statistics.


def firing_counts(gates: np.ndarray) -> np.ndarray:
  """Returns the number of examples each gate is on for, shape (c,), int64."""
  gates = _as_bool_gates(gates)
  return np.count_nonzero(gates, axis=0).astype(np.int64)


def gate_census(gates: np.ndarray, layout: Layout) -> list[dict[str, Any]]:
  """Classifies every gate as always on, always off or input-dependent (Figures 2 and 6).

  A gate is *always on* if it is 1 for all n examples, *always off* if it is 0 for all of them,
  and *input-dependent* otherwise, exactly as in the paper's appendix A.

  Args:
    gates: (n, c) binary gates.
    layout: the gated layers, in gate-vector order.

  Returns:
    One dict per gated layer, in order, with keys ``index`` (1-based depth), ``name``,
    ``filters``, ``always_on``, ``always_off`` and ``input_dependent`` (python ints; the last three
    add up to ``filters``). `census_totals` sums them over layers.
  """
  gates = _as_bool_gates(gates, layout)
  n = gates.shape[0]
  counts = firing_counts(gates)
  offsets = _offsets(layout)
  census = []
  for i, layer in enumerate(layout):
    layer_counts = counts[offsets[i] : offsets[i + 1]]
    always_on = int(np.count_nonzero(layer_counts == n))
    always_off = int(np.count_nonzero(layer_counts == 0))
    census.append(
      {
        'index': i + 1,
        'name': str(layer.name),
        'filters': int(layer.filters),
        'always_on': always_on,
        'always_off': always_off,
        'input_dependent': int(layer.filters) - always_on - always_off,
      }
    )
  return census


def census_totals(census: Sequence[Mapping[str, Any]]) -> dict[str, int]:
  """Sums a `gate_census` over layers: filters, always_on, always_off, input_dependent."""
  keys = ('filters', 'always_on', 'always_off', 'input_dependent')
  return {key: int(sum(layer[key] for layer in census)) for key in keys}


def input_dependent_firing(
  gates: np.ndarray, low: float = 0.01, high: float = 0.99
) -> dict[str, Any]:
  """Firing counts of the input-dependent gates and how many fire "often" (Figure 3).

  The paper notes that a gate on for a single example is technically input-dependent, and counts
  the input-dependent gates that are on for 100 to 9,900 of the 10,000 test examples. Here that
  range is ``[low * n, high * n]`` with BOTH bounds inclusive, i.e. a gate counts when
  ``ceil(low * n) <= firing count <= floor(high * n)`` (with a tiny tolerance so that e.g.
  ``0.07 * 100`` is 7, not 7.000000000000001).

  Args:
    gates: (n, c) binary gates.
    low: lower bound, as a fraction of the examples.
    high: upper bound, as a fraction of the examples.

  Returns:
    A dict with ``indices`` (gate indices of the input-dependent gates, int64 array), ``counts``
    (their firing counts, int64 array), ``num_input_dependent``, ``low``, ``high``,
    ``low_count`` and ``high_count`` (the inclusive bounds in examples) and ``num_between`` (how
    many input-dependent gates fire for between ``low_count`` and ``high_count`` examples).
  """
  if not 0.0 <= low <= high <= 1.0:
    raise errors.UserError(f'need 0 <= low <= high <= 1, got low={low}, high={high}')
  gates = _as_bool_gates(gates)
  n = gates.shape[0]
  counts = firing_counts(gates)
  indices = np.flatnonzero((counts > 0) & (counts < n))
  dependent = counts[indices]
  low_count = math.ceil(low * n - 1e-9)
  high_count = math.floor(high * n + 1e-9)
  num_between = int(np.count_nonzero((dependent >= low_count) & (dependent <= high_count)))
  return {
    'indices': indices,
    'counts': dependent,
    'num_input_dependent': int(indices.size),
    'low': float(low),
    'high': float(high),
    'low_count': int(low_count),
    'high_count': int(high_count),
    'num_between': num_between,
  }


def gates_on_per_example(gates: np.ndarray) -> np.ndarray:
  """Returns the number of gates on for each example, shape (n,), int64 (Figure 4)."""
  gates = _as_bool_gates(gates)
  return np.count_nonzero(gates, axis=1).astype(np.int64)


def summarize(values: np.ndarray) -> dict[str, float | int | None]:
  """Returns count, min, max, mean, std (population) and median of `values` as python numbers.

  Empty input gives count 0 and None for the rest, so the result is always JSON-friendly.
  """
  values = np.asarray(values)
  if values.size == 0:
    return {'count': 0, 'min': None, 'max': None, 'mean': None, 'std': None, 'median': None}
  return {
    'count': int(values.size),
    'min': values.min().item(),
    'max': values.max().item(),
    'mean': float(values.mean()),
    'std': float(values.std()),
    'median': float(np.median(values)),
  }


def _class_gate_sums(
  gates: np.ndarray, class_index: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per class: how many of its examples have each gate on (K, c), and its size (K,)."""
  sums = np.zeros((num_classes, gates.shape[1]), dtype=np.int64)
  sizes = np.bincount(class_index, minlength=num_classes).astype(np.int64)
  # A boolean-mask loop over classes touches each example once in total and needs no (K, n)
  # one-hot or float copy of the gates, which at 10,000 x 7,200 would cost hundreds of MB.
  for k in np.flatnonzero(sizes):
    sums[k] = np.count_nonzero(gates[class_index == k], axis=0)
  return sums, sizes


def per_class_usage(
  gates: np.ndarray, labels: np.ndarray, layout: Layout, num_classes: int
) -> np.ndarray:
  """Mean gate value per class and gated layer.

  Entry ``[k, l]`` is the fraction of layer l's gates that are on, averaged over the examples of
  class k. Classes without examples get NaN rows.

  Args:
    gates: (n, c) binary gates.
    labels: (n,) class indices in ``[0, num_classes)``.
    layout: the gated layers.
    num_classes: number of classes (rows).

  Returns:
    (num_classes, num_layers) float64 array.
  """
  gates = _as_bool_gates(gates, layout)
  labels = _as_labels(labels, gates.shape[0])
  if num_classes < 1 or labels.max() >= num_classes:
    raise errors.UserError(f'labels must lie in [0, {num_classes}), got max label {labels.max()}')
  sums, sizes = _class_gate_sums(gates, labels, num_classes)
  per_layer = _layer_sums(sums, layout).astype(np.float64)
  filters = np.array([layer.filters for layer in layout], dtype=np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    usage = per_layer / (sizes[:, None] * filters[None, :])
  usage[sizes == 0] = np.nan
  return usage


def class_similarity(gates: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """Mean normalized Hamming distance of gate vectors within vs. between classes.

  The paper's t-SNE (Figure 5) suggests that examples of the same class use similar gates; this
  puts a number on it. ``within`` is the mean, over all unordered pairs of distinct examples with
  the same label, of the fraction of the c gates on which the two differ; ``between`` is the same
  over all pairs with different labels. Both are pooled over pairs, not averaged over classes.

  It is exact but never forms an n x n matrix: for a gate on in s of a group's m examples, s * (m -
  s) of the group's unordered pairs differ on it, so the distance sums follow from the per-class
  counts of ones per gate in O(classes * c) memory.

  Args:
    gates: (n, c) binary gates.
    labels: (n,) integer labels (any non-negative values; they need not be contiguous).

  Returns:
    A dict with ``within`` and ``between`` (floats in [0, 1], or None when there are no such
    pairs), ``within_pairs`` and ``between_pairs`` (pair counts), and ``per_class``: a list of
    ``{'label', 'count', 'within'}`` with each class's own mean within-class distance.
  """
  gates = _as_bool_gates(gates)
  labels = _as_labels(labels, gates.shape[0])
  n, c = gates.shape
  classes, class_index = np.unique(labels, return_inverse=True)
  sums, sizes = _class_gate_sums(gates, class_index.reshape(-1), len(classes))
  # Exact integer sums: they are at most n^2 * c / 4 (~1.8e11 in the paper's case), far inside
  # int64, and only the final divisions are floating point.
  per_class_diff = (sums * (sizes[:, None] - sums)).sum(axis=1)
  per_class_pairs = sizes * (sizes - 1) // 2
  within_diff = int(per_class_diff.sum())
  within_pairs = int(per_class_pairs.sum())
  totals = sums.sum(axis=0)
  all_diff = int((totals * (n - totals)).sum())
  all_pairs = n * (n - 1) // 2
  between_diff = all_diff - within_diff
  between_pairs = all_pairs - within_pairs
  per_class = []
  for label, count, diff, pairs in zip(classes, sizes, per_class_diff, per_class_pairs):
    per_class.append(
      {
        'label': int(label),
        'count': int(count),
        'within': float(diff) / (int(pairs) * c) if pairs else None,
      }
    )
  return {
    'within': within_diff / (within_pairs * c) if within_pairs else None,
    'between': between_diff / (between_pairs * c) if between_pairs else None,
    'within_pairs': within_pairs,
    'between_pairs': between_pairs,
    'per_class': per_class,
  }


def macs_per_example(
  gates: np.ndarray, layout: Layout, *, backbone_macs: int, gater_macs: int
) -> np.ndarray:
  """MACs each example uses when off filters are skipped, shape (n,), int64.

  ``backbone_macs - sum(macs_per_filter of the gated filters that are off) + gater_macs``: the
  dense backbone's cost, less what the switched-off filters would have cost, plus one gater pass.

  Args:
    gates: (n, c) binary gates.
    layout: the gated layers with their per-filter cost.
    backbone_macs: MACs of one dense backbone forward pass (all filters on).
    gater_macs: MACs of one gater forward pass.

  Raises:
    UserError: if the costs are negative or the gated filters cost more than the whole backbone.
  """
  gates = _as_bool_gates(gates, layout)
  backbone_macs, gater_macs = int(backbone_macs), int(gater_macs)
  macs = np.array([layer.macs_per_filter for layer in layout], dtype=np.int64)
  filters = np.array([layer.filters for layer in layout], dtype=np.int64)
  gated_macs = int((macs * filters).sum())
  if backbone_macs <= 0 or gater_macs < 0:
    raise errors.UserError(
      f'need backbone_macs > 0 and gater_macs >= 0, got {backbone_macs} and {gater_macs}'
    )
  if gated_macs > backbone_macs:
    raise errors.UserError(
      f'the gated filters cost {gated_macs} MACs, more than the whole '
      f'backbone ({backbone_macs}); the layout or backbone_macs is wrong'
    )
  # macs_per_filter is constant within a layer, so only per-layer on-counts are needed: an
  # (n, L) integer product instead of an (n, c) one.
  on_macs = _layer_sums(gates, layout) @ macs
  return backbone_macs - (gated_macs - on_macs) + gater_macs


def compute_used(
  gates: np.ndarray, layout: Layout, *, backbone_macs: int, gater_macs: int
) -> dict[str, Any]:
  """Summarizes `macs_per_example` against the plain backbone.

  Args:
    gates: (n, c) binary gates.
    layout: the gated layers with their per-filter cost.
    backbone_macs: MACs of one dense backbone forward pass (the plain backbone's cost).
    gater_macs: MACs of one gater forward pass.

  Returns:
    A dict of python numbers: ``backbone_macs``, ``gater_macs``, ``gated_macs`` (the dense cost
    of all gated filters), ``mean``, ``std``, ``min``, ``max`` (MACs used per example, gater
    included), ``mean_backbone_part`` (the mean without the gater), and ``fraction``,
    ``min_fraction``, ``max_fraction`` (MACs used / backbone_macs).
  """
  used = macs_per_example(gates, layout, backbone_macs=backbone_macs, gater_macs=gater_macs)
  backbone_macs, gater_macs = int(backbone_macs), int(gater_macs)
  stats = summarize(used)
  return {
    'backbone_macs': backbone_macs,
    'gater_macs': gater_macs,
    'gated_macs': int(sum(layer.filters * layer.macs_per_filter for layer in layout)),
    'mean': stats['mean'],
    'std': stats['std'],
    'min': stats['min'],
    'max': stats['max'],
    'mean_backbone_part': stats['mean'] - gater_macs,
    'fraction': stats['mean'] / backbone_macs,
    'min_fraction': stats['min'] / backbone_macs,
    'max_fraction': stats['max'] / backbone_macs,
  }
