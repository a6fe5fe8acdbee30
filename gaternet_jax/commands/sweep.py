"""`gaternet sweep`: a grid over config fields, one resumable sub-workdir per point.

Every point is built and validated before the first one trains, its data-dependent checks
included (batch sizes against the examples and devices), so a bad value in the last point is
reported at once, naming the point, not after hours of training.

When every point has finished, `summarize` scores each on its evaluation split and `sweep.json`,
`sweep.md` and `sweep.png` set them side by side: top-1 error, gate density and MACs used per
point (over the field when the grid has one numeric axis: e.g. the λ curve of a gated config).
"""

from __future__ import annotations

import ast
import itertools
from typing import Any, Callable, Iterator, NamedTuple

import ml_collections

from gaternet_jax import configs, legacy, validation
from gaternet_jax.commands import summary_files
from gaternet_jax.errors import UserError
from gaternet_jax.training import preemption
from gaternet_jax.training import workdir as workdir_lib

SUMMARY_JSON = 'sweep.json'
TABLE_MD = 'sweep.md'
FIGURE_PNG = 'sweep.png'
FILES = summary_files.Names(SUMMARY_JSON, TABLE_MD, FIGURE_PNG)


class GridPoint(NamedTuple):
  """One point of the grid: its sub-workdir's name, its field values as given, its config."""

  name: str
  values: dict[str, str]
  config: ml_collections.ConfigDict


def parse_sweep(specs: list[str]) -> list[dict[str, str]]:
  """['a.b=1,2', 'c=x'] -> [{'a.b': '1', 'c': 'x'}, {'a.b': '2', 'c': 'x'}] (the grid)."""
  axes = []
  for spec in specs:
    field, sep, values = spec.partition('=')
    if not sep or not field.strip() or not values.strip():
      raise UserError(f'--sweep {spec!r}: expected field=value1,value2,...')
    axes.append([(field.strip(), v.strip()) for v in values.split(',')])
  return [dict(combo) for combo in itertools.product(*axes)]


def field_type(config: ml_collections.ConfigDict, field: str) -> type:
  """The declared type of a dotted field, as `--config.<field>=` overrides see it.

  Placeholders (fields whose default is None, e.g. `max_steps`) keep their declared type in the
  unresolved config, which is where it is read from.
  """
  *parents, leaf = field.split('.')
  node = config
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise UserError(f'--sweep: unknown config field {field!r}{legacy.renamed_hint(field)}')
    node = node[p]
  if leaf not in node:
    raise UserError(f'--sweep: unknown config field {field!r}{legacy.renamed_hint(field)}')
  if isinstance(node, ml_collections.ConfigDict):
    try:
      return node.get_ref(leaf).get_type()
    except ValueError:  # a plain None value has no type to read
      pass
  return type(node[leaf])


def set_field(config: ml_collections.ConfigDict, field: str, text: str, kind: type) -> None:
  """Sets a dotted field of `config` from text parsed as `kind`."""
  *parents, leaf = field.split('.')
  node = config
  for p in parents:
    node = node[p]
  try:
    node[leaf] = parse_value(text, kind)
  except (TypeError, ValueError, SyntaxError) as e:
    raise UserError(f'--sweep: bad value {text!r} for {field}: {e}') from None


def parse_value(text: str, kind: type) -> Any:
  """A command-line value as `kind` (bools accept true/false/1/0/yes/no; None accepts 'none')."""
  if text.lower() == 'none':
    return None
  if kind is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError('expected true/false')
  if kind in (int, float, str):
    return kind(text)
  return ast.literal_eval(text)


def grid_configs(config: ml_collections.ConfigDict, specs: list[str]) -> list[GridPoint]:
  """Every point of the grid, each config validated."""
  if not specs:  # (the grid of no axes is one point: the base config, which is not a sweep)
    raise UserError('--sweep field=v1,v2 is required (repeat it for a grid)')
  grid = parse_sweep(specs)
  points = []
  for point in grid:
    run_config = config.copy_and_resolve_references()
    for field, value in point.items():
      set_field(run_config, field, value, field_type(config, field))
    try:
      validation.validate_config(run_config)
    except UserError as e:
      raise UserError(f'sweep point {point}: {e}') from None
    name = ','.join(f'{k}={v}' for k, v in point.items())
    points.append(GridPoint(name, point, run_config))
  return points


def check_data(points: list[tuple[str, ml_collections.ConfigDict]]) -> None:
  """The checks that need the data, for every (label, config) before any trains: the dataset and
  its splits exist, the hold-out fits, the batch sizes fit the examples and the devices, the
  model builds. Each distinct data config is loaded once. Raises UserError naming the point."""
  import jax  # noqa: PLC0415 - the data and the steps need JAX; the grid's parsing does not

  from gaternet_jax import data as data_lib  # noqa: PLC0415
  from gaternet_jax.training import steps

  infos = {}
  for label, config in points:
    key = repr(sorted(configs.flatten(config.data).items()))
    try:
      if key not in infos:
        infos[key] = data_lib.load_dataset(
          config.data,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
          devices_per_process=jax.local_device_count(),
        ).info
      steps.build(config, infos[key])
    except UserError as e:
      raise UserError(f'{label}: {e}') from None


def sweep(
  points: list[GridPoint],
  workdir: str,
  train: Callable[[ml_collections.ConfigDict, str], dict[str, Any]],
  *,
  vectorize: bool = False,
  member_map: str | None = None,
) -> Iterator[dict[str, Any]]:
  """Trains every point of `grid_configs` in `workdir/<field=value,...>`; yields
  {'point': ..., **results}.

  With `vectorize`, the points train as one population (`training/population.py`: one program
  per stage, each point still an ordinary run in its own sub-workdir) and are yielded at the end.
  """
  if vectorize:
    from gaternet_jax.training import grid, population  # noqa: PLC0415 - JAX only when training

    population.check_vectorizable([run_config for _, _, run_config in points])
  check_data([(f'sweep point {point}', run_config) for _, point, run_config in points])
  if vectorize:
    results = grid.train_grid(
      [run_config for _, _, run_config in points],
      [workdir_lib.join(workdir, name) for name, _, _ in points],
      workdir,
      member_map=member_map,
    )
    for (_, point, _), result in zip(points, results, strict=True):
      yield {'point': point, **result}
    return
  for name, point, run_config in points:
    preemption.check_stop()
    yield {'point': point, **train(run_config, workdir_lib.join(workdir, name))}


def summarize(points: list[GridPoint], workdir: str) -> dict[str, Any]:
  """Every finished point's final evaluation (cached beside it), in grid order."""
  from gaternet_jax.commands import evaluate  # noqa: PLC0415 - JAX only when scoring

  rows = []
  for name, point, _ in points:
    result = evaluate.final_evaluation(workdir_lib.join(workdir, name))
    rows.append({
      'point': point,
      'workdir': name,
      'step': result['step'],
      'top1_error': result['top1_error'],
      'top5_error': result['top5_error'],
      'gate_density': result.get('gate_density', 1.0),
      'macs': result['macs'],
      'split': result['split'],
    })  # fmt: skip
  splits = sorted({row['split'] for row in rows})
  return {
    'name': points[0].config.name,
    'split': splits[0] if len(splits) == 1 else None,  # None: a grid over data.eval_split
    'fields': list(rows[0]['point']),
    'points': rows,
  }


def write_summary(summary: dict[str, Any], workdir: str) -> None:
  """`sweep.json`, `sweep.md` and `sweep.png` in `workdir` (process 0 only)."""
  from gaternet_jax.analysis import figures  # noqa: PLC0415 - matplotlib only here

  figure = figures.sweep_figure(summary, split_words(summary))
  summary_files.write(workdir, FILES, summary, markdown(summary), figure)


def split_words(summary: dict[str, Any]) -> str:
  """'holdout split', or 'each point's split' for a grid over the evaluation split."""
  return f'{summary["split"]} split' if summary['split'] else "each point's split"


def markdown(summary: dict[str, Any]) -> str:
  """One row per point: its values, top-1 error, gate density and MACs used."""
  fields = summary['fields']
  lines = [
    f'{summary["name"]}: {len(summary["points"])} points, {split_words(summary)}',
    '',
    '| ' + ' | '.join([*fields, 'top-1 error (%)', 'gates on', 'MACs used (M)', 'step']) + ' |',
    '|' + '---|' * (len(fields) + 4),
  ]
  for row in summary['points']:
    values = [row['point'][f] for f in fields]
    lines.append(
      '| '
      + ' | '.join([
        *values, f'{row["top1_error"]:.2f}', f'{100 * row["gate_density"]:.1f}%',
        f'{row["macs"] / 1e6:.2f}', str(row['step']),
      ])
      + ' |'
    )  # fmt: skip
  return '\n'.join(lines) + '\n'
