"""The figures of the gate analysis (paper Figures 2 to 6 and the per-class usage heatmap).

Figures are drawn on `matplotlib.figure.Figure` objects with their own Agg canvas, never through
pyplot, so the caller's matplotlib state is left untouched; `save_figure` writes one as a PNG to
any path `etils.epath` understands, ``gs://`` included.
"""

from __future__ import annotations

import io
import itertools
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib import colormaps, ticker
from matplotlib import figure as mpl_figure
from matplotlib.backends import backend_agg

_DPI = 120
# One colour per gate type, the same in every figure; blue/orange/grey stay distinguishable for
# the common forms of colour blindness.
_COLOR_ON = '#1f77b4'
_COLOR_DEPENDENT = '#ff7f0e'
_COLOR_OFF = '#b0b0b0'
# Above this many classes a per-class legend or tick label stops being readable.
_MAX_LEGEND_CLASSES = 20
_MAX_CLASS_TICKS = 25


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


def tradeoff_figure(
  rows: Sequence[Mapping[str, float]],
  *,
  model_name: str,
  split: str,
  num_examples: int,
  plain_macs: float,
  plain_error: float | None = None,
) -> mpl_figure.Figure:
  """Top-1 error vs MACs per image as the gate threshold moves, the plain backbone marked.

  Args:
    rows: one per threshold: `threshold`, `top1_error` (%), `macs` (mean per image).
    model_name, split, num_examples: for the title.
    plain_macs: MACs of one plain backbone pass (a vertical line).
    plain_error: the plain model's top-1 error on the same split, when known (a star).
  """
  fig = _new_figure(7.0, 4.6)
  ax = fig.add_subplot()
  macs = np.array([r['macs'] for r in rows]) / 1e6
  errors = np.array([r['top1_error'] for r in rows])
  ax.plot(macs, errors, '-o', color=_COLOR_ON, label="GaterNet, gates 1(g' > T)")
  ax.axvline(plain_macs / 1e6, color=_COLOR_OFF, linestyle='--', label='plain backbone cost')
  if plain_error is not None:
    ax.plot([plain_macs / 1e6], [plain_error], '*', color=_COLOR_DEPENDENT, markersize=12,
            label='plain model')  # fmt: skip
  ax.set_xlabel('MACs per image (millions; gater included, filters that are on)')
  ax.set_ylabel('top-1 error (%)')
  ax.grid(alpha=0.3)
  ax.legend(loc='best', fontsize=8)
  ax.set_title(_title('Accuracy vs compute as the gate threshold T moves', model_name, split,
                      num_examples))  # fmt: skip
  labels = [f'T={r["threshold"]:g}' for r in rows]
  _label_points(fig, ax, list(zip(macs, errors)), labels)
  return fig


# Where a point's label may go (offset points from it, and which end of the text sits there),
# tried in order until its box overlaps no label placed before it and stays inside the axes:
# thresholds a step apart often land a few pixels apart on the curve.
_LABEL_PLACES = (
  (4, 4, 'left'), (4, -12, 'left'), (-4, 4, 'right'), (-4, -12, 'right'),
  (6, 14, 'left'), (6, -22, 'left'), (-6, 14, 'right'), (-6, -22, 'right'),
)  # fmt: skip


def _label_points(fig, ax, points, labels) -> None:
  """Annotates each (x, y) with its label at the first place that overlaps no earlier label and
  stays inside the axes (the first place if none does)."""
  fig.draw_without_rendering()  # runs the constrained layout, so the boxes are where they end
  renderer = fig.canvas.get_renderer()
  frame = ax.get_window_extent(renderer)

  def put(label, x, y, place):
    dx, dy, align = place
    text = ax.annotate(label, (x, y), textcoords='offset points', xytext=(dx, dy), fontsize=8,
                       ha=align)  # fmt: skip
    return text, text.get_window_extent(renderer)

  placed = []
  for (x, y), label in zip(points, labels):
    for place in _LABEL_PLACES:
      text, box = put(label, x, y, place)
      inside = (
        frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 <= box.y1 <= frame.y1
      )
      if inside and not any(box.overlaps(other) for other in placed):
        break
      text.remove()
    else:  # no free place
      text, box = put(label, x, y, _LABEL_PLACES[0])
    placed.append(box)


def reproduce_figure(summary: dict) -> mpl_figure.Figure:
  """`gaternet reproduce`'s summary: each run kind's top-1 error per seed (dots) and mean +- std
  (bar), and its mean MACs used per image."""
  kinds = list(summary['runs'])
  fig = _new_figure(8.0, 3.4)
  errors, macs = fig.subplots(1, 2, width_ratios=(3, 2))
  for x, kind in enumerate(kinds):
    run = summary['runs'][kind]
    mean, std = run['top1_error']['mean'], run['top1_error']['std']
    errors.bar(x, mean, yerr=std, color=f'C{x}', alpha=0.35, capsize=4)
    per_seed = [run['per_seed'][str(s)]['top1_error'] for s in summary['seeds']]
    errors.scatter([x] * len(per_seed), per_seed, color=f'C{x}', zorder=3, s=14)
    macs.bar(x, run['macs']['mean'] / 1e6, color=f'C{x}', alpha=0.6)
  low = min(run['per_seed'][str(s)]['top1_error'] for run in summary['runs'].values()
            for s in summary['seeds'])  # fmt: skip
  errors.set_ylim(bottom=max(0.0, low - 2.0))
  for ax in (errors, macs):
    ax.set_xticks(range(len(kinds)), kinds)
  errors.set_ylabel(f'top-1 error (%), {summary["split"]}')
  macs.set_ylabel('MACs used per image (millions)')
  fig.suptitle(
    f'{summary["name"]}: {len(summary["seeds"])} seeds, '
    f'{summary["epochs_per_stage"]:g} epochs per stage'
  )
  return fig


def _numbers(values: list[str]) -> list[float] | None:
  try:
    return [float(v) for v in values]
  except ValueError:
    return None


def sweep_figure(summary: dict, split_words: str) -> mpl_figure.Figure:
  """`gaternet sweep`'s summary: top-1 error and MACs used per point, over the field's value
  when the grid has one numeric axis (a symmetric-log axis when it spans a decade or more from
  0), else one labelled point each. `split_words` names the split the errors are on."""
  points = summary['points']
  fields = summary['fields']
  x = _numbers([p['point'][fields[0]] for p in points]) if len(fields) == 1 else None
  if x is not None:  # a curve over the field, whatever order the grid listed its values in
    x, points = map(list, zip(*sorted(zip(x, points), key=lambda pair: pair[0])))
  fig = _new_figure(8.0, 3.4)
  errors, macs = fig.subplots(1, 2)
  positions = x if x is not None else list(range(len(points)))
  for ax, values, label in (
    (errors, [p['top1_error'] for p in points], f'top-1 error (%), {split_words}'),
    (macs, [p['macs'] / 1e6 for p in points], 'MACs used per image (millions)'),
  ):
    ax.plot(positions, values, marker='o')
    ax.set_ylabel(label)
    if x is None:
      names = [', '.join(f'{k}={v}' for k, v in p['point'].items()) for p in points]
      ax.set_xticks(positions, names, rotation=30, ha='right', fontsize=7)
    else:
      ax.set_xlabel(fields[0])
      positive = [v for v in x if v > 0]
      if min(x) >= 0 and positive and max(x) / min(positive) >= 10:
        ax.set_xscale('symlog', linthresh=min(positive))
  for p, position, error in zip(points, positions, [p['top1_error'] for p in points]):
    errors.annotate(f'{100 * p["gate_density"]:.0f}% on', (position, error), fontsize=7,
                    textcoords='offset points', xytext=(3, 4))  # fmt: skip
  errors.margins(x=0.08, y=0.15)  # room for the labels
  fig.suptitle(f'{summary["name"]}: {len(points)} points (labels: gates on)')
  return fig


def save_figure(fig: mpl_figure.Figure, path: str | os.PathLike) -> None:
  """Writes `fig` as a PNG to `path`, a local path or any `etils.epath` URL (e.g. ``gs://``).

  The PNG is rendered in memory first, so a remote file is written in one piece.

  Raises:
    OSError: if the file cannot be written.
  """
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=_DPI)
  epath.Path(path).write_bytes(buffer.getvalue())
