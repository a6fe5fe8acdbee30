"""`gaternet evaluate`: restore a run's checkpoint and score a whole split."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gaternet_jax import configs, models
from gaternet_jax.commands import describe
from gaternet_jax.errors import CheckpointError, UserError
from gaternet_jax.training import dispatch, distributed, restore
from gaternet_jax.training import workdir as workdir_lib

# `final_evaluation`'s cache beside a finished run, keyed by the step it scored; before
# 2026-12-06 `reproduce` wrote it under the older name, which is still read.
EVALUATION_JSON = 'evaluation.json'
OLDER_EVALUATION_JSON = 'reproduce_evaluation.json'


def _cached_evaluation(directory: str, step: int) -> dict | None:
  for name in (EVALUATION_JSON, OLDER_EVALUATION_JSON):
    if workdir_lib.exists(directory, name):
      cached = workdir_lib.read_json(directory, name)
      if cached.get('step') == step:
        return cached
  return None


def final_evaluation(directory: str) -> dict:
  """`evaluate_workdir` of a finished run on its evaluation split, cached beside it by step: a
  rerun of `gaternet reproduce` or `gaternet sweep` scores nothing again. Process 0 decides
  whether the cache serves (the evaluation is collective: every host scores, or none)."""
  step = workdir_lib.read_results(directory)['step']
  if distributed.agree(lambda: _cached_evaluation(directory, step) is not None):
    cached = _cached_evaluation(directory, step)
    if cached is None:
      raise CheckpointError(
        f'{directory!r}: process 0 reads its {EVALUATION_JSON} for step {step}, this host does '
        'not; the workdir must be storage every host sees alike'
      )
    return cached
  result = evaluate_workdir(directory)
  if distributed.is_leader():
    workdir_lib.write_json(directory, EVALUATION_JSON, result)
  return result


def evaluate_workdir(
  workdir: str,
  split: str | None = None,
  step: int | None = None,
  gate_threshold: float = 0.0,
  skip_off_units: bool = False,
) -> dict:
  """Top-1/top-5 error, loss, gate density and MACs used of a trained run over a whole split.

  Args:
    workdir: a run directory or a procedure workdir (its joint stage).
    split: the split to score (default: the config's `data.eval_split`).
    step: the checkpoint (default: the latest).
    gate_threshold: T of the evaluation gates 1(g' > T); 0 is the trained model, a higher T
      switches more filters off (the compute knob; gated runs only).
    skip_off_units: skip every unit whose gates are all off for the whole batch
      (`models.with_unit_skipping`: the same results; GaterNets of the ResNets only).

  Returns:
    A JSON-serialisable dict: workdir, name, variant, split, step, the metrics, params, gated
    filters and `macs` (mean per image actually used: the gater and the filters that are on).
  """
  if not math.isfinite(gate_threshold):
    raise UserError(f'--gate_threshold must be a finite number, got {gate_threshold}')
  directory = restore.require_checkpoint(workdir)
  config, setup, state, dataset, step = restore.load_state(directory, step=step)
  if gate_threshold != 0.0 and not config.model.gated:
    raise UserError(
      f'{workdir!r} holds a {configs.variant_of(config)} model: it has no gates to threshold'
    )
  if skip_off_units:
    setup = dataclasses.replace(setup, model=models.with_unit_skipping(setup.model))
  info = dataset.info
  split = split or config.data.eval_split
  info.split_size(split, '--split')  # a clear error for an unknown --split
  totals = dispatch.Evaluator(setup, dataset).totals(state, split, gate_threshold)
  stats = describe.describe(config, num_classes=info.num_classes, image_shape=info.image_shape)
  layout = models.gate_layout(config, info.image_shape) if config.model.gated else []
  result = {
    'workdir': workdir,
    'name': config.name,
    'variant': configs.variant_of(config),
    'split': split,
    'step': int(step),
    **metrics_with_macs(totals, stats, layout),
    'params': stats['total_params'],
    'gated_filters': stats['gated_filters'],
  }
  if config.model.gated:
    result['gate_threshold'] = float(gate_threshold)
  return result


def metrics_with_macs(totals: dict[str, Any], stats: dict[str, Any], layout) -> dict[str, Any]:
  """`dispatch.summarize` of an Evaluator's totals, plus `macs`: the mean MACs per image used
  (the gater and the filters that were on), from the per-gate on-counts."""
  metrics = dispatch.summarize(totals)
  counts = totals.get('gate_counts', [])
  metrics['macs'] = describe.mean_macs_used(stats, layout, counts, metrics['examples'])
  return metrics


def format_text(result: dict[str, Any]) -> str:
  """The human-readable form of `evaluate_workdir`'s result."""
  lines = [
    f'{result["name"]} ({result["variant"]}) step {result["step"]}, {result["split"]}: '
    f'{result["examples"]} examples',
    f'  top-1 error   {result["top1_error"]:.2f}%',
    f'  top-5 error   {result["top5_error"]:.2f}%',
    f'  loss          {result["loss"]:.4f}',
    f'  parameters    {result["params"]:,} ({result["params"] / 1e6:.2f}M)',
    f'  gated filters {result["gated_filters"]:,}',
    f'  MACs/image    {result["macs"] / 1e6:.2f}M (used: the gater and the filters that are on)',
  ]
  if 'gate_density' in result:
    lines.append(f'  gate density  {result["gate_density"]:.4f} (mean fraction of gates on)')
    lines.append(f"  gate threshold {result['gate_threshold']:g} (gates are 1(g' > T))")
  return '\n'.join(lines)
