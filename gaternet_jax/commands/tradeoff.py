"""`gaternet tradeoff`: accuracy vs compute of a trained GaterNet as its gate threshold moves.

Evaluation gates are 1(g' > T); the trained model is T = 0, and a higher T switches more filters
off without retraining. For each T the split is scored once (one compilation serves every T) and
the mean MACs per image actually used are computed from how often each gate was on.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from gaternet_jax import configs, models
from gaternet_jax.commands import describe, evaluate
from gaternet_jax.errors import UserError
from gaternet_jax.training import dispatch, distributed, restore
from gaternet_jax.training import workdir as workdir_lib

TRADEOFF_DIR = 'tradeoff'
JSON_FILE = 'tradeoff.json'
PNG_FILE = 'tradeoff.png'
DEFAULT_THRESHOLDS = (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0)


def parse_thresholds(text: str | None) -> tuple[float, ...]:
  """'T1,T2,...' as ascending unique floats; UserError for anything that is not a number."""
  if text is None:
    return DEFAULT_THRESHOLDS
  values = []
  for item in text.split(','):
    try:
      value = float(item)
    except ValueError:
      raise UserError(
        f'--thresholds takes numbers separated by commas, got {item.strip()!r}'
      ) from None
    if not math.isfinite(value):
      raise UserError(f'--thresholds must be finite, got {item.strip()!r}')
    values.append(value)
  return tuple(sorted(set(values)))


def plain_error(workdir: str, config, split: str) -> float | None:
  """The plain model's top-1 error on `split`, where the run has one: its procedure's stage 1, or
  the run its `init.backbone` took stage 1 from, evaluated on that split."""
  candidates = [workdir_lib.join(workdir, workdir_lib.STAGE_BACKBONE)]
  if config.init.get('backbone'):
    candidates.append(restore.pretrained_dir(config.init.backbone, workdir_lib.STAGE_BACKBONE))
  for stage in candidates:
    if not workdir_lib.is_finished(stage):
      continue
    results = workdir_lib.read_results(stage)
    if results.get('split') == split and 'top1_error' in results.get('eval', {}):
      return float(results['eval']['top1_error'])
  return None


def tradeoff_workdir(
  workdir: str,
  *,
  split: str | None = None,
  thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
  out_dir: str | None = None,
) -> dict[str, Any]:
  """Scores the run in `workdir` at every threshold; writes `tradeoff.json` and `tradeoff.png`
  to `out_dir` (default WORKDIR/tradeoff). Returns the JSON's content."""
  if not thresholds:
    raise UserError('--thresholds needs at least one value')
  directory = restore.require_checkpoint(workdir)
  config, setup, state, dataset, step = restore.load_state(directory)
  if not config.model.gated:
    raise UserError(
      f'{workdir!r} holds a {configs.variant_of(config)} model; tradeoff needs a gated run'
    )
  info = dataset.info
  split = split or config.data.eval_split
  info.split_size(split, '--split')  # a clear error for an unknown --split
  stats = describe.describe(config, num_classes=info.num_classes, image_shape=info.image_shape)
  plain = describe.describe(
    describe.plain_backbone_config(config),
    num_classes=info.num_classes,
    image_shape=info.image_shape,
  )
  layout = models.gate_layout(config, info.image_shape)
  evaluator = dispatch.Evaluator(setup, dataset)
  rows = []
  for threshold in sorted(thresholds):
    metrics = evaluate.metrics_with_macs(evaluator.totals(state, split, threshold), stats, layout)
    rows.append(
      {'threshold': float(threshold)}
      | {k: metrics[k] for k in ('top1_error', 'top5_error', 'gate_density', 'macs')}
    )
  result = {
    'workdir': workdir,
    'name': config.name,
    'split': split,
    'step': int(step),
    'examples': int(metrics['examples']),
    'plain_backbone_macs': plain['backbone_macs'],
    'plain_error': plain_error(workdir, config, split),
    'rows': rows,
  }
  if distributed.is_leader():
    from gaternet_jax.analysis import figures  # noqa: PLC0415 - matplotlib only here

    out = out_dir or workdir_lib.join(workdir, TRADEOFF_DIR)
    workdir_lib.path(out).mkdir(parents=True, exist_ok=True)
    workdir_lib.write_json(out, JSON_FILE, result)
    fig = figures.tradeoff_figure(
      rows,
      model_name=f'{config.name} ({configs.variant_of(config)})',
      split=split,
      num_examples=result['examples'],
      plain_macs=plain['backbone_macs'],
      plain_error=result['plain_error'],
    )
    figures.save_figure(fig, workdir_lib.path(out, PNG_FILE))
  return result


def format_text(result: dict[str, Any]) -> str:
  """The table `gaternet tradeoff` prints."""
  lines = [
    f'{result["name"]} step {result["step"]}, {result["split"]} ({result["examples"]} examples); '
    f'plain backbone {result["plain_backbone_macs"] / 1e6:.2f}M MACs',
    f'  {"threshold":>9}  {"top-1 %":>8}  {"top-5 %":>8}  {"density":>8}  {"MACs (M)":>9}',
  ]
  for r in result['rows']:
    lines.append(
      f'  {r["threshold"]:>9g}  {r["top1_error"]:>8.2f}  {r["top5_error"]:>8.2f}  '
      f'{r["gate_density"]:>8.4f}  {r["macs"] / 1e6:>9.3f}'
    )
  return '\n'.join(lines)
