"""`gaternet export`: a trained GaterNet as a smaller static model that computes the same thing.

The GaterNet runs in evaluation mode over a calibration split; every gated filter is then
  - always off: removed (its output channel of the gated convolution and its batch-norm entries;
    a residual unit's output channel becomes the shortcut alone, which is what the gate at 0 gave);
  - always on: kept and ungated (its row of the gater's FC2 is removed);
  - input-dependent: kept and still gated, FC2 reduced to exactly those gates.
A layer left with no input-dependent gate runs no gating code; with none anywhere the gater is
dropped and the export is a plain static network. A locally gated run (Batch-Shaping) is cut the
same way on its units' first convolutions: an always-off filter leaves the first convolution, its
batch norm and the second convolution's input; a unit's gating module keeps only the FC2 rows of
its input-dependent channels (none: the module goes); a unit that lost every filter feeds zeros,
exactly what its all-off gates gave, to the rest of the unit. On the calibration split the export computes
the same function (checked and recorded in `export.json`); elsewhere a filter that was never on
there may have been on, which is why the agreement on a second split is reported too.

The export is an ordinary run directory (the config with its plan as `model.pruning`, an Orbax
checkpoint), so `gaternet evaluate`, `analyze`, `tradeoff` and `load_run` take it.
"""

from __future__ import annotations

import os
from typing import Any

import flax.traverse_util
import jax
import numpy as np

from gaternet_jax import configs, models
from gaternet_jax.analysis import collect
from gaternet_jax.commands import describe
from gaternet_jax.data.base import TRAIN
from gaternet_jax.errors import UserError
from gaternet_jax.gating.local import MODULE_NAME as LOCAL_GATE_MODULE
from gaternet_jax.layout import GatedLayer, layer_offsets
from gaternet_jax.models import pruning as pruning_lib
from gaternet_jax.training import checkpoints, distributed, restore, steps
from gaternet_jax.training import workdir as workdir_lib

EXPORT_DIR = 'export'
EXPORT_FILE = 'export.json'
# An export is written into `<out>.partial` first and renamed into place once complete; this file
# marks that folder as ours, so that only a folder this command made is ever deleted.
STAGING_MARKER = '.gaternet_export_staging'


def _staging(out: str) -> str:
  return out.rstrip('/') + '.partial'


def plan_from_gates(gates: np.ndarray, layout: list[GatedLayer]):
  """`plan_from_counts` of calibration gates (n, c)."""
  gates = np.asarray(gates, bool)
  if gates.ndim != 2 or gates.shape[1] != layer_offsets(layout)[-1]:
    raise ValueError(f'need (n, {layer_offsets(layout)[-1]}) calibration gates, got {gates.shape}')
  return plan_from_counts(gates.sum(axis=0), len(gates), layout)


def plan_from_counts(on: np.ndarray, examples: int, layout: list[GatedLayer]):
  """The channel plan implied by how many of `examples` calibration examples each gate was on
  for, and per-layer counts.

  Returns:
    (pruning, layers, dynamic): the plan (models/pruning.py), one dict per gated layer (`name`,
    `filters`, `gates_removed`, `gates_folded`, `gates_kept`), and the indices into the original
    gate vector of the gates that stay (the rows FC2 keeps), ascending.
  """
  on = np.asarray(on)
  offsets = layer_offsets(layout)
  if on.shape != (offsets[-1],) or examples < 1:
    raise ValueError(f'need {offsets[-1]} gate counts over >= 1 examples, got {on.shape}')
  plan, rows, dynamic = [], [], []
  for layer, start in zip(layout, offsets):
    counts = on[start : start + layer.filters]
    kept = np.flatnonzero(counts > 0)
    is_dynamic = counts[kept] < examples
    gated = tuple(map(int, np.flatnonzero(is_dynamic)))
    plan.append((layer.name, pruning_lib.PrunedLayer(tuple(map(int, kept)), gated)))
    dynamic.extend(start + kept[is_dynamic])
    rows.append(
      {
        'name': layer.name,
        'filters': layer.filters,
        'gates_removed': int(layer.filters - len(kept)),
        'gates_folded': int(len(kept) - is_dynamic.sum()),
        'gates_kept': int(is_dynamic.sum()),
      }
    )
  return tuple(plan), rows, np.asarray(dynamic, np.int64)


def export_config(config, pruning: pruning_lib.Pruning, gated: bool):
  """The source config with the plan as `model.pruning` (gated only if a gate stays)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.model.pruning = pruning_lib.to_config(pruning)
    out.model.gated = gated
  return out


def prune_tree(source: Any, target: Any, pruning: pruning_lib.Pruning, dynamic: np.ndarray):
  """The source variables cut to the export's shapes.

  Every leaf the export still has keeps its source values; where its shape changed, each changed
  axis is a channel axis of a pruned layer: in a backbone unit, the gated convolution's output
  axis and its batch norm's (GaterNet: the last convolution; local gating: the first one, and the
  second convolution's input axis), all cut to the unit's kept channels; a unit's local gating
  module's FC2 cut to its input-dependent channels; the gater's FC2 cut to the kept gates.
  """
  kept, gated = {}, {}
  for name, p in pruning:
    unit = name.replace('/', '_')
    kept[unit] = np.asarray(p.kept, np.int64)
    gated[unit] = kept[unit][list(p.gated)]
  flat_source = flax.traverse_util.flatten_dict(source)
  out = {}
  for path, spec in flax.traverse_util.flatten_dict(target).items():
    value = np.asarray(flat_source[path])
    module = path[1:]  # below the collection ('params', 'batch_stats')
    if tuple(value.shape) != tuple(spec.shape):
      if module[0] == 'backbone' and len(module) > 1 and module[1] in kept:
        local_gate = LOCAL_GATE_MODULE in module[2:-1]
        value = _take_changed_axes(value, spec.shape, (gated if local_gate else kept)[module[1]])
      elif module[:2] == ('gater', 'fc2'):
        value = value[..., dynamic]
      if tuple(value.shape) != tuple(spec.shape):
        raise ValueError(f'cannot cut {"/".join(path)} to {spec.shape}')
    out[path] = value
  return flax.traverse_util.unflatten_dict(out)


def _take_changed_axes(value: np.ndarray, shape, index: np.ndarray) -> np.ndarray:
  """`value` with `index` taken along every axis whose length differs from `shape`'s."""
  if value.ndim != len(shape):
    return value
  for axis, (have, want) in enumerate(zip(value.shape, shape)):
    if have != want:
      value = np.take(value, index, axis=axis)
  return value


def _check_exportable(config, workdir: str) -> None:
  if not config.model.gated:
    raise UserError(
      f'{workdir!r} holds a {configs.variant_of(config)} model; export needs a gated run'
    )
  if 'pruning' in config.model:
    raise UserError(f'{workdir!r} is already an export; export its source run instead')
  if config.model.backbone not in models.PRUNABLE:
    raise UserError(
      f'export supports the ResNet backbones ({", ".join(models.PRUNABLE)}), '
      f'not {config.model.backbone}'
    )
  if config.model.se_reduction:
    raise UserError('export cannot prune SE units: SE mixes every channel before the gate')


def _check_out(out: str, source: str) -> None:
  """`out` must be new, empty, or an earlier export of the same run (which is replaced)."""
  root = workdir_lib.path(out)
  if root.exists() and not root.is_dir():
    raise UserError(f'--out {out!r} is a file')
  staging = _staging(out)
  if workdir_lib.exists(staging) and not workdir_lib.exists(staging, STAGING_MARKER):
    raise UserError(
      f"{staging!r} exists and was not made by gaternet export (it is used as the export's "
      'staging folder): move it, or choose another --out'
    )
  if not root.exists() or not any(root.iterdir()):
    return
  if workdir_lib.exists(out, EXPORT_FILE):
    previous = workdir_lib.read_json(out, EXPORT_FILE).get('source')
    if previous and os.path.abspath(previous) == os.path.abspath(source):
      return
  raise UserError(f'--out {out!r} holds a different run; choose an empty or new directory')


def _gate_counts(batches) -> tuple[np.ndarray, int]:
  """How many examples each gate was on for, and the number of examples, over a stream of
  `collect.predicted_batches` (the gates themselves are never held all at once)."""
  counts, examples = 0, 0
  for out in batches:
    counts = counts + out['gates'].sum(axis=0, dtype=np.int64)
    examples += len(out['gates'])
  return np.asarray(counts), examples


def _compare(source_batches, export_batches) -> tuple[dict[str, Any], np.ndarray]:
  """Agreement of two models batch by batch over the same examples, and the export's gate
  counts there (empty when it has no gates)."""
  identical, worst, examples, counts = 0, 0.0, 0, 0
  for a, b in zip(source_batches, export_batches, strict=True):
    identical += int(np.sum(a['logits'].argmax(-1) == b['logits'].argmax(-1)))
    worst = max(worst, float(np.max(np.abs(a['logits'] - b['logits']), initial=0.0)))
    examples += len(a['logits'])
    if 'gates' in b:
      counts = counts + b['gates'].sum(axis=0, dtype=np.int64)
  agreement = {
    'examples': examples,
    'top1_identical': identical / max(examples, 1),
    'max_abs_logit_difference': worst,
  }
  return agreement, np.asarray(counts) if np.ndim(counts) else np.zeros(0, np.int64)


def export_workdir(
  workdir: str,
  *,
  split: str | None = None,
  max_examples: int | None = None,
  out: str | None = None,
) -> dict[str, Any]:
  """Exports the run in `workdir` (default calibration split: the training images, unaugmented)
  to `out` (default WORKDIR/export); returns what `export.json` records."""
  if max_examples is not None and max_examples < 1:
    raise UserError(f'--max_examples must be at least 1, got {max_examples}')
  directory = restore.require_checkpoint(workdir)
  config, setup, state, dataset, step = restore.load_state(directory)
  _check_exportable(config, workdir)
  split = split or TRAIN
  info = dataset.info
  info.split_size(split, '--split')  # a clear error for an unknown --split
  out = out or workdir_lib.join(workdir, EXPORT_DIR)
  if os.path.abspath(out) == os.path.abspath(directory):
    raise UserError('--out must not be the run directory itself')
  _check_out(out, directory)

  def batches(which, on_split, keys=('logits', 'gates')):
    st, su, fn = which
    return collect.predicted_batches(st, dataset, on_split, su, fn, max_examples, keys)

  source = (state, setup, steps.compile_steps(setup)[2])
  on_counts, examples = _gate_counts(batches(source, split, keys=('gates',)))
  layout = models.gate_layout(config, info.image_shape)
  pruning, layer_rows, dynamic = plan_from_counts(on_counts, examples, layout)
  new_config = export_config(config, pruning, gated=len(dynamic) > 0)
  new_setup = steps.build(new_config, info, mesh=setup.mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  target = {'params': new_setup.abstract_state.params}
  target['batch_stats'] = new_setup.abstract_state.batch_stats
  cut = prune_tree(jax.device_get(variables), target, pruning, dynamic)
  new_state = steps.TrainState(
    step=state.step,
    params=cut['params'],
    batch_stats=cut['batch_stats'],
    opt_state=new_setup.tx.init(cut['params']),  # fresh optimizer state for fine-tuning
  )
  new_state = jax.device_put(new_state, new_setup.replicated)

  # The check, streamed: both models over the calibration split (and a second split).
  exported = (new_state, new_setup, steps.compile_steps(new_setup)[2])
  agreement, new_counts = {}, None
  other = config.data.eval_split if config.data.eval_split != split else TRAIN
  for on_split in dict.fromkeys((split, other)):
    agreement[on_split], counts = _compare(batches(source, on_split), batches(exported, on_split))
    new_counts = counts if new_counts is None else new_counts

  before = describe.describe(config, num_classes=info.num_classes, image_shape=info.image_shape)
  after = describe.describe(new_config, num_classes=info.num_classes, image_shape=info.image_shape)
  new_layout = models.gate_layout(new_config, info.image_shape) if new_config.model.gated else []
  totals = {
    k: sum(r[k] for r in layer_rows) for k in ('gates_removed', 'gates_folded', 'gates_kept')
  }
  result = {
    'source': os.path.abspath(directory) if not workdir_lib.is_remote(directory) else directory,
    'source_step': int(step),
    'out': out,
    'calibration_split': split,
    'calibration_examples': examples,
    'params_before': before['total_params'],
    'params_after': after['total_params'],
    'macs_before': describe.mean_macs_used(before, layout, on_counts, examples),
    'macs_after': describe.mean_macs_used(after, new_layout, new_counts, examples),
    # What the masked (dense) implementation executes per image: every filter, gated or not.
    'dense_macs_before': before['backbone_macs'] + before['gater_macs'],
    'dense_macs_after': after['backbone_macs'] + after['gater_macs'],
    **totals,
    'layers': layer_rows,
    'agreement': agreement,
    'exact_on_calibration': bool(agreement[split]['top1_identical'] == 1.0),
  }
  _write(out, new_config, new_setup, new_state, int(step), result)
  return result


def _write(out: str, config, setup, state, step: int, result: dict[str, Any]) -> None:
  """Writes the export into a fresh `out` (an earlier export of the same run is replaced only
  once the new one is complete)."""
  staging = _staging(out)
  if distributed.is_leader():
    if workdir_lib.exists(staging):
      if not workdir_lib.exists(staging, STAGING_MARKER):  # checked first; a folder made since
        raise UserError(f'{staging!r} was not made by gaternet export; it is left as it is')
      workdir_lib.path(staging).rmtree()  # left by an export that did not finish
    workdir_lib.ensure_writable(staging)
    workdir_lib.path(staging, STAGING_MARKER).write_text('gaternet export staging folder\n')
    workdir_lib.save_config(config, staging)
  distributed.barrier('export-staging')
  manager = checkpoints.make_manager(staging, keep=1)
  checkpoints.save(manager, staging, step, state)
  checkpoints.finish(manager, staging, step)
  if distributed.is_leader():
    workdir_lib.write_json(staging, EXPORT_FILE, result)
    workdir_lib.path(staging, STAGING_MARKER).unlink()
    if workdir_lib.exists(out):
      workdir_lib.path(out).rmtree()
    workdir_lib.path(staging).rename(workdir_lib.path(out))
  distributed.barrier('export-done')


def format_text(result: dict[str, Any]) -> str:
  """The summary `gaternet export` prints."""
  calib = result['agreement'][result['calibration_split']]
  lines = [
    f'Exported {result["source"]} (step {result["source_step"]}) to {result["out"]}',
    f'  calibration: {result["calibration_examples"]} examples of {result["calibration_split"]!r}',
    f'  gates: {result["gates_removed"]} removed (always off), {result["gates_folded"]} folded '
    f'(always on), {result["gates_kept"]} kept (input-dependent)',
    f'  parameters {result["params_before"]:,} -> {result["params_after"]:,}',
    f'  MACs/image used {result["macs_before"] / 1e6:.2f}M -> {result["macs_after"] / 1e6:.2f}M; '
    f'computed {result["dense_macs_before"] / 1e6:.2f}M -> {result["dense_macs_after"] / 1e6:.2f}M',
  ]
  for split, a in result['agreement'].items():
    lines.append(
      f'  {split}: top-1 identical on {100 * a["top1_identical"]:.2f}% of {a["examples"]}, '
      f'max |logit difference| {a["max_abs_logit_difference"]:.2e}'
    )
  if calib['top1_identical'] < 1.0:
    lines.append('  warning: predictions differ on the calibration split')
  return '\n'.join(lines)
