"""Analysis of the binary gates a trained gater produces (paper section 4.2.1 and appendix A).

Given the evaluation-mode gate vector of every example of a split, this module reproduces the
paper's gate-distribution study:

* the census of always-on / always-off / input-dependent gates per gated layer (Figures 2 and 6);
* how many examples each input-dependent gate fires for, and how many of them fire for between 1%
  and 99% of the examples (Figure 3 and the "1,124 of 1,567" count in the text);
* how many gates are on per example (Figure 4);
* a PCA + t-SNE embedding of the gate vectors coloured by label (Figure 5);

plus three numbers the paper argues from but does not tabulate: the mean gate value per class and
layer, the mean Hamming distance between gate vectors within and between classes, and the
multiply-accumulates (MACs) each example actually uses when off filters are skipped.

Inputs everywhere are ``gates``, an ``(n, c)`` array of 0/1 values (bool preferred, any integer or
float array holding only 0 and 1 accepted), ``labels``, an ``(n,)`` integer array, and ``layout``,
the backbone's ordered gated layers (`GatedLayer`), whose slices concatenate to the gate vector.

The module is deliberately framework-free (numpy, matplotlib, scikit-learn only) so that saved
gates can be analysed on any machine. Figures are drawn on `matplotlib.figure.Figure` objects with
their own Agg canvas, never through pyplot, so the caller's matplotlib state is left untouched.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import pathlib
import zipfile
from typing import Any, Mapping, Sequence

from matplotlib import colormaps
from matplotlib import figure as mpl_figure
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np

from gaternet_jax import errors

from gaternet_jax import layout as layout_lib

_LOG = logging.getLogger(__name__)

PathLike = str | os.PathLike
# The ordered gated layers of a backbone; their slices concatenate to the gate vector.
Layout = Sequence['layout_lib.GatedLayer']

# Version of the gates.npz layout; bump it if the stored arrays change meaning.
GATES_FORMAT_VERSION = 1

# File names analyze() writes; other code (reports, tests) refers to them through these names.
GATES_FILE = 'gates.npz'
JSON_FILE = 'analysis.json'
CENSUS_PERCENT_PNG = 'census_percent.png'
CENSUS_COUNTS_PNG = 'census_counts.png'
FIRING_HISTOGRAM_PNG = 'firing_histogram.png'
GATES_PER_EXAMPLE_PNG = 'gates_per_example.png'
TSNE_PNG = 'tsne.png'
CLASS_LAYER_USAGE_PNG = 'class_layer_usage.png'
FIGURE_FILES = (
  CENSUS_PERCENT_PNG,
  CENSUS_COUNTS_PNG,
  FIRING_HISTOGRAM_PNG,
  GATES_PER_EXAMPLE_PNG,
  TSNE_PNG,
  CLASS_LAYER_USAGE_PNG,
)

# The paper reduces the 7,200-d gate vectors to 400 dimensions with PCA before t-SNE.
PCA_DIMS = 400
MAX_PERPLEXITY = 30.0

_DPI = 120
# One colour per gate type, the same in every figure; blue/orange/grey stay distinguishable for
# the common forms of colour blindness.
_COLOR_ON = '#1f77b4'
_COLOR_DEPENDENT = '#ff7f0e'
_COLOR_OFF = '#b0b0b0'
# Above this many classes a per-class legend or tick label stops being readable.
_MAX_LEGEND_CLASSES = 20
_MAX_CLASS_TICKS = 25


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
# Storage.


def save_gates(path: PathLike, gates: np.ndarray, labels: np.ndarray, layout: Layout) -> None:
  """Writes gates, labels and layout to a compressed ``.npz`` file, bit-packed.

  Bit-packing makes the paper's 10,000 x 7,200 case ~9 MB instead of 72 MB. The file is written
  to exactly `path` (no ``.npz`` is appended) via a temporary file and an atomic rename, so a
  reader never sees half a file.

  Args:
    path: where to write, conventionally ``.../gates.npz``.
    gates: (n, c) binary gates.
    labels: (n,) integer labels.
    layout: the gated layers; c must equal the sum of their filters.

  Raises:
    UserError: on malformed input or an unwritable path.
  """
  gates = _as_bool_gates(gates, layout)
  labels = _as_labels(labels, gates.shape[0])
  path = pathlib.Path(path)
  arrays = {
    'format_version': np.int64(GATES_FORMAT_VERSION),
    'num_gates': np.int64(gates.shape[1]),
    'packed_gates': np.packbits(gates, axis=1),
    'labels': labels,
    'layer_names': np.array([str(layer.name) for layer in layout], dtype=np.str_),
    'layer_filters': np.array([int(layer.filters) for layer in layout], dtype=np.int64),
    'layer_macs_per_filter': np.array(
      [int(layer.macs_per_filter) for layer in layout], dtype=np.int64
    ),
  }
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so the rename is atomic; the pid keeps concurrent writers apart.
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
      with open(tmp, 'wb') as f:
        np.savez_compressed(f, **arrays)
      os.replace(tmp, path)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
  except OSError as e:
    raise errors.UserError(f'cannot write gates to {path}: {e}') from e


def load_gates(path: PathLike) -> tuple[np.ndarray, np.ndarray, list[layout_lib.GatedLayer]]:
  """Reads a file written by `save_gates`.

  Args:
    path: the ``.npz`` file.

  Returns:
    ``(gates, labels, layout)``: gates as an (n, c) bool array, labels as (n,) int64, layout as a
    list of `GatedLayer` with plain python field types.

  Raises:
    UserError: if the file is missing, corrupt or inconsistent.
  """
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      version = int(data['format_version'])
      if version != GATES_FORMAT_VERSION:
        raise errors.UserError(
          f'{path}: gates format version {version} is not supported '
          f'(expected {GATES_FORMAT_VERSION})'
        )
      num_gates = int(data['num_gates'])
      packed = data['packed_gates']
      labels = data['labels'].astype(np.int64)
      names = data['layer_names']
      filters = data['layer_filters']
      macs = data['layer_macs_per_filter']
  except FileNotFoundError as e:
    raise errors.UserError(f'gates file not found: {path}') from e
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise errors.UserError(f'{path} is not a readable gates file: {e}') from e
  if packed.ndim != 2 or packed.shape[1] != (num_gates + 7) // 8:
    raise errors.UserError(
      f'{path}: packed gates of shape {packed.shape} do not hold {num_gates} gates'
    )
  if labels.shape != (packed.shape[0],) or not len(names) == len(filters) == len(macs):
    raise errors.UserError(f'{path}: labels or layout arrays have inconsistent lengths')
  layout = [
    layout_lib.GatedLayer(str(name), int(f), int(m)) for name, f, m in zip(names, filters, macs)
  ]
  if layout_lib.total_filters(layout) != num_gates:
    raise errors.UserError(
      f'{path}: the layout gates {layout_lib.total_filters(layout)} filters '
      f'but the file holds {num_gates} gates'
    )
  # unpackbits yields 0/1 uint8; viewing it as bool avoids a second 1-byte-per-gate copy.
  gates = np.unpackbits(packed, axis=1, count=num_gates).view(np.bool_)
  return gates, labels, layout


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


# ---------------------------------------------------------------------------------------------
# Embedding.


def embedding_subset(n: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
  """Indices (sorted) of the examples `embed_gates` embeds: all, or a seeded random subset."""
  if max_examples is not None and max_examples < 1:
    raise errors.UserError(f'max_examples must be at least 1 or None, got {max_examples}')
  if max_examples is None or max_examples >= n:
    return np.arange(n)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n, size=max_examples, replace=False))


def embedding_skip_reason(gates: np.ndarray) -> str | None:
  """Why t-SNE cannot embed these gate vectors, or None if it can."""
  gates = np.asarray(gates)
  if gates.shape[0] < 3:
    return f'fewer than 3 examples ({gates.shape[0]}); t-SNE needs at least 3'
  if not np.any(gates != gates[0]):
    return 'all gate vectors are identical (zero variance); there is nothing to embed'
  return None


def embedding_params(m: int, c: int) -> dict[str, float | int]:
  """PCA dimensions and t-SNE perplexity used for m examples with c gates.

  The paper uses PCA to 400 dimensions; with few examples or gates that is capped at what PCA can
  return (at most m - 1 informative components). t-SNE requires perplexity < m; the usual 30 is
  kept when possible and shrunk to (m - 1) / 3 (but not below 1) so that tiny inputs still work.
  """
  return {
    'pca_dims': int(max(1, min(PCA_DIMS, c, m - 1))),
    'perplexity': float(max(1.0, min(MAX_PERPLEXITY, (m - 1) / 3.0))),
  }


def embed_gates(
  gates: np.ndarray, seed: int = 0, max_examples: int | None = None
) -> np.ndarray | None:
  """Embeds gate vectors in 2-D with PCA then t-SNE, as for the paper's Figure 5.

  Deterministic for a given seed (it seeds the subset, PCA and t-SNE).

  Args:
    gates: (n, c) binary gates.
    seed: random seed.
    max_examples: embed at most this many examples, a random subset chosen by
      ``embedding_subset(n, max_examples, seed)`` (use it to find which rows, e.g. for labels).
      t-SNE's cost grows faster than linearly in the number of points, so analyses cap it.

  Returns:
    (m, 2) float64 coordinates of the embedded examples in the order of
    ``embedding_subset(...)``, or None when the input is degenerate (fewer than 3 examples or all
    gate vectors identical); `embedding_skip_reason` says why, and it is logged.
  """
  # Imported here because scikit-learn's manifold module is slow to import and most callers of
  # this module (e.g. census only) never need it.
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top

  gates = _as_bool_gates(gates)
  subset = gates[embedding_subset(gates.shape[0], max_examples, seed)]
  reason = embedding_skip_reason(subset)
  if reason is not None:
    _LOG.warning('Skipping the gate embedding: %s', reason)
    return None
  m, c = subset.shape
  params = embedding_params(m, c)
  # float32 halves the memory of the dense copy; precision is irrelevant for a 2-D picture.
  x = subset.astype(np.float32)
  x = PCA(n_components=params['pca_dims'], random_state=seed).fit_transform(x)
  # t-SNE's PCA initialisation needs at least two input dimensions.
  init = 'pca' if x.shape[1] >= 2 else 'random'
  tsne = TSNE(
    n_components=2,
    perplexity=params['perplexity'],
    init=init,
    learning_rate='auto',
    random_state=seed,
  )
  return tsne.fit_transform(x).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Figures.


def _new_figure(width: float, height: float) -> mpl_figure.Figure:
  """A figure with its own Agg canvas, so that nothing touches pyplot's global state."""
  fig = mpl_figure.Figure(figsize=(width, height), dpi=_DPI, layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _title(what: str, model_name: str, split: str, num_examples: int) -> str:
  return f'{what}\n{model_name} | {split} | {num_examples:,} examples'


def _layer_axis(ax, num_layers: int) -> None:
  """Integer layer ticks 1..L; every layer when few enough to stay legible."""
  ax.set_xlim(0.4, num_layers + 0.6)
  if num_layers <= 30:
    ax.set_xticks(np.arange(1, num_layers + 1))
  else:
    # A round step (5, 10, 20, 50, ...) plus layer 1, so the shallowest layer is always labelled.
    step = next(
      s
      for s in itertools.chain.from_iterable(
        (2 * 10**e, 5 * 10**e, 10 * 10**e) for e in itertools.count()
      )
      if num_layers / s <= 20
    )
    ax.set_xticks([1, *range(step, num_layers + 1, step)])
  ax.set_xlabel('gated layer (1 = shallowest)')


def census_figure(
  census: Sequence[Mapping[str, Any]],
  *,
  percent: bool,
  model_name: str,
  split: str,
  num_examples: int,
) -> mpl_figure.Figure:
  """Stacked bars of always-on / input-dependent / always-off gates per layer (Figs. 2 and 6)."""
  num_layers = len(census)
  fig = _new_figure(max(7.0, min(18.0, 3.0 + 0.22 * num_layers)), 4.8)
  ax = fig.add_subplot()
  x = np.arange(1, num_layers + 1)
  filters = np.array([layer['filters'] for layer in census], dtype=np.float64)
  scale = 100.0 / filters if percent else np.ones_like(filters)
  bottom = np.zeros(num_layers)
  for key, label, color in (
    ('always_on', 'always on', _COLOR_ON),
    ('input_dependent', 'input-dependent', _COLOR_DEPENDENT),
    ('always_off', 'always off', _COLOR_OFF),
  ):
    heights = np.array([layer[key] for layer in census], dtype=np.float64) * scale
    ax.bar(x, heights, bottom=bottom, width=0.8, color=color, label=label, linewidth=0)
    bottom += heights
  _layer_axis(ax, num_layers)
  if percent:
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of the layer's gates")
    what = 'Gate types per layer (%)'
  else:
    ax.set_ylim(0, filters.max() * 1.02)
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel('number of gates')
    what = 'Gate types per layer (counts)'
  ax.set_title(_title(what, model_name, split, num_examples))
  # Outside the axes: inside, the legend would hide the top of the bars.
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), frameon=False)
  return fig


def firing_histogram_figure(
  firing: Mapping[str, Any], *, model_name: str, split: str, num_examples: int
) -> mpl_figure.Figure:
  """Histogram of how many examples each input-dependent gate is on for (Figure 3)."""
  fig = _new_figure(8.0, 4.8)
  ax = fig.add_subplot()
  counts = np.asarray(firing['counts'])
  ax.set_title(_title('How often input-dependent gates fire', model_name, split, num_examples))
  ax.set_xlabel('number of examples the gate is on for')
  ax.set_ylabel('number of gates')
  ax.set_xlim(0, num_examples)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  if counts.size == 0:
    ax.text(
      0.5,
      0.5,
      'no input-dependent gates',
      ha='center',
      va='center',
      transform=ax.transAxes,
      fontsize=12,
    )
    return fig
  # One bin per possible count for small splits, so that bins and integer counts line up.
  if num_examples <= 100:
    bins = np.arange(0.5, num_examples, 1.0)
  else:
    bins = np.linspace(0, num_examples, 51)
  ax.hist(
    counts,
    bins=bins,
    color=_COLOR_DEPENDENT,
    edgecolor='white',
    linewidth=0.5,
    label=f'{counts.size:,} input-dependent gates',
  )
  band = (
    f'{firing["low"]:.0%}-{firing["high"]:.0%} of examples '
    f'({firing["low_count"]:,}-{firing["high_count"]:,}): {firing["num_between"]:,} gates'
  )
  for i, bound in enumerate((firing['low_count'], firing['high_count'])):
    ax.axvline(bound, color='black', linestyle='--', linewidth=1, label=band if i == 0 else None)
  # Headroom above the tallest bar keeps the legend from covering it.
  ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
  ax.legend(loc='upper center')
  return fig


def gates_per_example_figure(
  on_counts: np.ndarray, num_gates: int, *, model_name: str, split: str
) -> mpl_figure.Figure:
  """Histogram of the number of gates on per example, with its statistics (Figure 4)."""
  fig = _new_figure(8.0, 4.8)
  ax = fig.add_subplot()
  on_counts = np.asarray(on_counts)
  lo, hi = int(on_counts.min()), int(on_counts.max())
  # One bin per integer while that stays readable, otherwise 40 even bins.
  if hi - lo + 1 <= 60:
    bins = np.arange(lo, hi + 2) - 0.5
  else:
    bins = np.linspace(lo - 0.5, hi + 0.5, 41)
  ax.hist(on_counts, bins=bins, color=_COLOR_ON, edgecolor='white', linewidth=0.5)
  mean, std = float(on_counts.mean()), float(on_counts.std())
  ax.axvline(
    mean,
    color='black',
    linestyle='--',
    linewidth=1,
    label=(f'min {lo:,}   max {hi:,}\nmean {mean:,.1f}   std {std:,.1f}\n(of {num_gates:,} gates)'),
  )
  if hi - lo < 6:
    # Widen a narrow range, else the integer tick locator falls back to fractional ticks.
    ax.set_xlim(max(-0.5, lo - 3.5), hi + 3.5)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # Room for the statistics above the bars.
  ax.legend(loc='upper right', handlelength=1.5)
  ax.set_xlabel('number of gates on')
  ax.set_ylabel('number of examples')
  ax.set_title(_title('Gates on per example', model_name, split, on_counts.size))
  return fig


def _class_label(k: int, class_names: Sequence[str] | None) -> str:
  return str(class_names[k]) if class_names is not None and k < len(class_names) else str(k)


def tsne_figure(
  points: np.ndarray | None,
  labels: np.ndarray,
  *,
  model_name: str,
  split: str,
  num_examples: int,
  class_names: Sequence[str] | None = None,
  skip_reason: str | None = None,
) -> mpl_figure.Figure:
  """Scatter of the 2-D gate embedding coloured by label (Figure 5), or why it was skipped."""
  # A message needs far less room than a scatter.
  fig = _new_figure(8.5, 6.5) if points is not None else _new_figure(7.0, 3.0)
  ax = fig.add_subplot()
  if points is None:
    ax.set_title(_title('t-SNE of gate vectors', model_name, split, num_examples))
    ax.text(
      0.5,
      0.5,
      f'embedding skipped:\n{skip_reason or "unknown reason"}',
      ha='center',
      va='center',
      transform=ax.transAxes,
      fontsize=11,
      wrap=True,
    )
    ax.set_axis_off()
    return fig
  labels = np.asarray(labels)
  classes = np.unique(labels)
  what = (
    f't-SNE of gate vectors (PCA first; {len(points):,} of {num_examples:,} embedded)'
    if len(points) < num_examples
    else 't-SNE of gate vectors (PCA first)'
  )
  ax.set_title(_title(what, model_name, split, num_examples))
  # t-SNE coordinates carry no units, so ticks would only be clutter.
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_xlabel('t-SNE dimension 1')
  ax.set_ylabel('t-SNE dimension 2')
  size = 30 if len(points) <= 200 else 12 if len(points) <= 1000 else 5
  if len(classes) <= _MAX_LEGEND_CLASSES:
    cmap = colormaps['tab10' if len(classes) <= 10 else 'tab20']
    for i, k in enumerate(classes):
      mask = labels == k
      ax.scatter(
        points[mask, 0],
        points[mask, 1],
        s=size,
        color=cmap(i),
        alpha=0.8,
        linewidths=0,
        label=_class_label(int(k), class_names),
      )
    ax.legend(
      loc='upper left', bbox_to_anchor=(1.01, 1.0), frameon=False, markerscale=2.5, title='label'
    )
  else:
    # Too many classes for a legend: a continuous colour scale indexed by label instead.
    sc = ax.scatter(
      points[:, 0], points[:, 1], s=size, c=labels, cmap='turbo', alpha=0.8, linewidths=0
    )
    fig.colorbar(sc, ax=ax, label='label (class index)')
  return fig


def class_layer_usage_figure(
  usage: np.ndarray,
  *,
  model_name: str,
  split: str,
  num_examples: int,
  class_names: Sequence[str] | None = None,
) -> mpl_figure.Figure:
  """Heatmap of the mean gate value per class (rows) and gated layer (columns)."""
  num_classes, num_layers = usage.shape
  fig = _new_figure(
    max(7.0, min(18.0, 3.5 + 0.22 * num_layers)), max(4.5, min(9.0, 2.2 + 0.28 * num_classes))
  )
  ax = fig.add_subplot()
  cmap = colormaps['viridis'].with_extremes(bad='#dddddd')
  im = ax.imshow(
    np.ma.masked_invalid(usage),
    aspect='auto',
    cmap=cmap,
    vmin=0.0,
    vmax=1.0,
    interpolation='nearest',
    extent=(0.5, num_layers + 0.5, num_classes - 0.5, -0.5),
  )
  _layer_axis(ax, num_layers)
  ax.set_xlim(0.5, num_layers + 0.5)
  if num_classes <= _MAX_CLASS_TICKS:
    ax.set_yticks(np.arange(num_classes))
    ax.set_yticklabels([_class_label(k, class_names) for k in range(num_classes)])
  else:
    ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=20, integer=True))
  ax.set_ylabel('class')
  fig.colorbar(im, ax=ax, label='mean gate value (fraction of layer on)')
  ax.set_title(_title('Gate usage per class and layer', model_name, split, num_examples))
  return fig


# ---------------------------------------------------------------------------------------------
# Everything at once.


def _jsonable(value: Any) -> Any:
  """Converts numpy types to python ones and NaN/inf to None, recursively."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def analyze(
  gates: np.ndarray,
  labels: np.ndarray,
  layout: Layout,
  *,
  out_dir: PathLike,
  model_name: str,
  split: str,
  backbone_macs: int,
  gater_macs: int,
  class_names: Sequence[str] | None = None,
  max_embed_examples: int | None = 2000,
  seed: int = 0,
) -> dict[str, Any]:
  """Runs the whole gate analysis and writes its figures, numbers and gates to `out_dir`.

  Writes `FIGURE_FILES` (PNG), ``analysis.json`` (the returned dict) and ``gates.npz`` (see
  `save_gates`). Apart from t-SNE, which is bounded by `max_embed_examples`, this takes a few
  seconds for the paper's 10,000 x 7,200 case.

  Args:
    gates: (n, c) binary gates of every example of the split.
    labels: (n,) integer labels.
    layout: the backbone's gated layers.
    out_dir: output directory, created if needed.
    model_name: shown in every figure title and stored in the JSON.
    split: e.g. ``test``; likewise.
    backbone_macs: MACs of one dense backbone pass.
    gater_macs: MACs of one gater pass.
    class_names: optional names of the classes (index = label); sets the number of classes.
      Without it, the number of classes is ``max(labels) + 1``.
    max_embed_examples: t-SNE embeds at most this many examples (a seeded random subset); 0
      skips the embedding, None embeds all.
    seed: random seed of the t-SNE subset, PCA and t-SNE.

  Returns:
    The JSON-serializable dict written to ``analysis.json``.

  Raises:
    UserError: on malformed input or an unwritable out_dir.
  """
  gates = _as_bool_gates(gates, layout)
  n, c = gates.shape
  labels = _as_labels(labels, n)
  num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
  if labels.max() >= num_classes:
    raise errors.UserError(f'label {labels.max()} has no class name ({num_classes} names given)')
  out_dir = pathlib.Path(out_dir)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'cannot create the analysis directory {out_dir}: {e}') from e

  census = gate_census(gates, layout)
  firing = input_dependent_firing(gates)
  on_counts = gates_on_per_example(gates)
  usage = per_class_usage(gates, labels, layout, num_classes)
  similarity = class_similarity(gates, labels)
  compute = compute_used(gates, layout, backbone_macs=backbone_macs, gater_macs=gater_macs)

  if max_embed_examples == 0:
    subset = np.arange(0)
    points, skip_reason = None, 'disabled (max_embed_examples=0)'
  else:
    subset = embedding_subset(n, max_embed_examples, seed)
    skip_reason = embedding_skip_reason(gates[subset])
    points = None if skip_reason else embed_gates(gates, seed=seed, max_examples=max_embed_examples)
  embedding = {
    'status': 'skipped' if points is None else 'ok',
    'reason': skip_reason,
    'num_points': 0 if points is None else int(len(points)),
    'max_examples': max_embed_examples,
    'seed': seed,
    'method': f'PCA to at most {PCA_DIMS} dims, then t-SNE to 2-D',
  }
  if points is not None:
    embedding.update(embedding_params(len(subset), c))

  result = {
    'model_name': model_name,
    'split': split,
    'num_examples': n,
    'num_gates': c,
    'num_layers': len(layout),
    'num_classes': num_classes,
    'class_names': list(class_names) if class_names is not None else None,
    'census': {'layers': census, 'totals': census_totals(census)},
    'firing': {
      'num_input_dependent': firing['num_input_dependent'],
      'low': firing['low'],
      'high': firing['high'],
      'low_count': firing['low_count'],
      'high_count': firing['high_count'],
      'num_between': firing['num_between'],
      'input_dependent_counts': summarize(firing['counts']),
    },
    'gates_per_example': summarize(on_counts),
    'class_similarity': similarity,
    'per_class_usage': {
      'layer_names': [layer['name'] for layer in census],
      'matrix': usage,
    },
    'compute': compute,
    'embedding': embedding,
    'files': [GATES_FILE, JSON_FILE, *FIGURE_FILES],
  }
  result = _jsonable(result)

  common = {'model_name': model_name, 'split': split}
  figures = {
    CENSUS_PERCENT_PNG: census_figure(census, percent=True, num_examples=n, **common),
    CENSUS_COUNTS_PNG: census_figure(census, percent=False, num_examples=n, **common),
    FIRING_HISTOGRAM_PNG: firing_histogram_figure(firing, num_examples=n, **common),
    GATES_PER_EXAMPLE_PNG: gates_per_example_figure(on_counts, c, **common),
    TSNE_PNG: tsne_figure(
      points,
      labels[subset],
      num_examples=n,
      class_names=class_names,
      skip_reason=skip_reason,
      **common,
    ),
    CLASS_LAYER_USAGE_PNG: class_layer_usage_figure(
      usage, num_examples=n, class_names=class_names, **common
    ),
  }
  try:
    for name, fig in figures.items():
      fig.savefig(out_dir / name, dpi=_DPI)
    with open(out_dir / JSON_FILE, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2, allow_nan=False)
      f.write('\n')
  except OSError as e:
    raise errors.UserError(f'cannot write the analysis to {out_dir}: {e}') from e
  save_gates(out_dir / GATES_FILE, gates, labels, layout)
  return result
