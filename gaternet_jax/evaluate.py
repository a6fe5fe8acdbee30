"""`gaternet evaluate`: restore a run's checkpoint and score a whole split."""

from __future__ import annotations

from typing import Any

from gaternet_jax import describe, device_loops, restore


def evaluate_workdir(workdir: str, split: str | None = None, step: int | None = None) -> dict:
  """Top-1/top-5 error, loss and gate density of a trained run over every example of a split.

  Args:
    workdir: a run directory or a procedure workdir (its joint stage).
    split: the split to score (default: the config's `data.eval_split`).
    step: the checkpoint (default: the latest).

  Returns:
    A JSON-serialisable dict: workdir, name, variant, split, step, the metrics, params and gated
    filters.
  """
  directory = restore.require_checkpoint(workdir)
  config, setup, state, dataset, step = restore.load_state(directory, step=step)
  split = split or config.data.eval_split
  dataset.info.split_size(split)  # a clear error for an unknown split
  metrics = device_loops.Evaluator(setup, dataset)(state, split)
  stats = describe.describe(
    config, num_classes=dataset.info.num_classes, image_shape=dataset.info.image_shape
  )
  return {
    'workdir': workdir,
    'name': config.name,
    'variant': config.variant,
    'split': split,
    'step': int(step),
    **metrics,
    'params': stats['total_params'],
    'gated_filters': stats['gated_filters'],
  }


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
  ]
  if 'gate_density' in result:
    lines.append(f'  gate density  {result["gate_density"]:.4f} (mean fraction of gates on)')
  return '\n'.join(lines)
