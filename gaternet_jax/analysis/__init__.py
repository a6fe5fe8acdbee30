"""Analysis of the binary gates a trained gater produces (paper section 4.2.1 and appendix A).

Given the evaluation-mode gate vector of every example of a split, this package reproduces the
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

The package is deliberately framework-free (numpy, matplotlib, scikit-learn only) so that saved
gates can be analysed on any machine. Figures are drawn on `matplotlib.figure.Figure` objects with
their own Agg canvas, never through pyplot, so the caller's matplotlib state is left untouched.
Every file is read and written through `etils.epath`, so the output folder may be ``gs://...``.

Files:

* ``stats.py``: input validation and every statistic (census, firing counts, gates per example,
  per-class usage, class similarity, MACs used); pure numpy.
* ``embedding.py``: the PCA + t-SNE embedding (scikit-learn, imported only when it runs).
* ``figures.py``: every figure, and `save_figure`, which writes one as a PNG.
* ``storage.py``: `save_gates` / `load_gates` (bit-packed ``gates.npz``) and `write_json`.
* ``__init__.py``: the output file names and `analyze`, which runs all of the above and writes
  its results to one folder; it also re-exports the public names of the other files, so
  ``analysis.gate_census`` and ``analysis.stats.gate_census`` are the same function.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from etils import epath

from gaternet_jax import errors
from gaternet_jax.analysis import embedding, stats, storage
from gaternet_jax.analysis.embedding import (
  MAX_PERPLEXITY,
  PCA_DIMS,
  embed_gates,
  embedding_params,
  embedding_skip_reason,
  embedding_subset,
)
from gaternet_jax.analysis.stats import (
  Layout,
  census_totals,
  class_similarity,
  compute_used,
  firing_counts,
  gate_census,
  gates_on_per_example,
  input_dependent_firing,
  macs_per_example,
  per_class_usage,
  summarize,
)
from gaternet_jax.analysis.storage import (
  GATES_FORMAT_VERSION,
  PathLike,
  load_gates,
  save_gates,
  write_json,
)

if TYPE_CHECKING:
  from gaternet_jax.analysis import figures
  from gaternet_jax.analysis.figures import (
    census_figure,
    class_layer_usage_figure,
    firing_histogram_figure,
    gates_per_example_figure,
    save_figure,
    tsne_figure,
  )

# The figures need matplotlib, which takes about half a second to import. `gaternet` imports this
# package for every command (training and evaluation draw nothing), so `figures` and its names
# load on first use (PEP 562); `analysis.figures.census_figure` and
# `from gaternet_jax.analysis import census_figure` work as before.
_FIGURE_NAMES = frozenset(
  {
    'census_figure',
    'class_layer_usage_figure',
    'firing_histogram_figure',
    'gates_per_example_figure',
    'save_figure',
    'tsne_figure',
  }
)


def __getattr__(name: str) -> Any:
  if name == 'figures' or name in _FIGURE_NAMES:
    # import_module, not `from . import figures`: that asks this very __getattr__ first.
    figures = importlib.import_module(f'{__name__}.figures')
    return figures if name == 'figures' else getattr(figures, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  # The lazy names too, so a notebook's completion lists them before they are first used.
  return sorted({*globals(), 'figures', *_FIGURE_NAMES})


__all__ = [
  'CENSUS_COUNTS_PNG',
  'CENSUS_PERCENT_PNG',
  'CLASS_LAYER_USAGE_PNG',
  'FIGURE_FILES',
  'FIRING_HISTOGRAM_PNG',
  'GATES_FILE',
  'GATES_FORMAT_VERSION',
  'GATES_PER_EXAMPLE_PNG',
  'JSON_FILE',
  'Layout',
  'MAX_PERPLEXITY',
  'PCA_DIMS',
  'PathLike',
  'TSNE_PNG',
  'analyze',
  'census_figure',
  'census_totals',
  'class_layer_usage_figure',
  'class_similarity',
  'compute_used',
  'embed_gates',
  'embedding',
  'embedding_params',
  'embedding_skip_reason',
  'embedding_subset',
  'figures',
  'firing_counts',
  'firing_histogram_figure',
  'gate_census',
  'gates_on_per_example',
  'gates_per_example_figure',
  'input_dependent_firing',
  'load_gates',
  'macs_per_example',
  'per_class_usage',
  'save_figure',
  'save_gates',
  'stats',
  'storage',
  'summarize',
  'tsne_figure',
  'write_json',
]

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
    out_dir: output directory, created if needed; a local path or any `etils.epath` URL
      (e.g. ``gs://bucket/analysis``).
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
  gates = stats._as_bool_gates(gates, layout)
  n, c = gates.shape
  labels = stats._as_labels(labels, n)
  num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
  if labels.max() >= num_classes:
    raise errors.UserError(f'label {labels.max()} has no class name ({num_classes} names given)')
  out_dir = epath.Path(out_dir)
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
  embedding_info = {
    'status': 'skipped' if points is None else 'ok',
    'reason': skip_reason,
    'num_points': 0 if points is None else int(len(points)),
    'max_examples': max_embed_examples,
    'seed': seed,
    'method': f'PCA to at most {PCA_DIMS} dims, then t-SNE to 2-D',
  }
  if points is not None:
    embedding_info.update(embedding_params(len(subset), c))

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
    'embedding': embedding_info,
    'files': [GATES_FILE, JSON_FILE, *FIGURE_FILES],
  }
  result = _jsonable(result)

  from gaternet_jax.analysis import figures  # noqa: PLC0415 - matplotlib (see __getattr__)

  common = {'model_name': model_name, 'split': split}
  drawn = {
    CENSUS_PERCENT_PNG: figures.census_figure(census, percent=True, num_examples=n, **common),
    CENSUS_COUNTS_PNG: figures.census_figure(census, percent=False, num_examples=n, **common),
    FIRING_HISTOGRAM_PNG: figures.firing_histogram_figure(firing, num_examples=n, **common),
    GATES_PER_EXAMPLE_PNG: figures.gates_per_example_figure(on_counts, c, **common),
    TSNE_PNG: figures.tsne_figure(
      points,
      labels[subset],
      num_examples=n,
      class_names=class_names,
      skip_reason=skip_reason,
      **common,
    ),
    CLASS_LAYER_USAGE_PNG: figures.class_layer_usage_figure(
      usage, num_examples=n, class_names=class_names, **common
    ),
  }
  try:
    for name, fig in drawn.items():
      figures.save_figure(fig, out_dir / name)
    write_json(out_dir / JSON_FILE, result)
  except OSError as e:
    raise errors.UserError(f'cannot write the analysis to {out_dir}: {e}') from e
  save_gates(out_dir / GATES_FILE, gates, labels, layout)
  return result
