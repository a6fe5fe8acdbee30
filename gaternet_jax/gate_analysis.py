"""`gaternet analyze`: run a trained GaterNet over a split and analyse its gates (section 4.2.1).

Restores the latest checkpoint of a workdir with its stored config, collects every example's binary
gate vector in evaluation mode (data-parallel, like evaluation), and hands them to
`gaternet_jax.analysis.analyze`, which writes the census, histograms, t-SNE, per-class usage,
compute-used numbers, figures, `analysis.json` and `gates.npz`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from gaternet_jax import analysis, describe, models, procedure, train
from gaternet_jax.errors import UserError


def collect_gates(
  state, dataset, split: str, setup, predict_fn, max_examples: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """Binary gates (n, c) and labels (n,) of the first `max_examples` examples of `split`."""
  info = dataset.info
  total = info.split_size(split)
  if max_examples is not None:
    total = min(total, max_examples)
  local_batch = setup.config.eval_batch_size // jax.process_count()
  gates, labels = [], []
  collected = 0
  with tqdm.tqdm(
    total=total, desc=f'gates on {split}', unit='img', disable=jax.process_index() > 0
  ) as bar:
    for batch in dataset.eval_iterator(split, local_batch):
      out = predict_fn(state, train.to_global(batch, setup.data_sharding))
      batch_gates = multihost_utils.process_allgather(out['gates'], tiled=True)
      batch_labels = multihost_utils.process_allgather(
        jax.make_array_from_process_local_data(setup.data_sharding, batch['label']), tiled=True
      )
      batch_mask = multihost_utils.process_allgather(
        jax.make_array_from_process_local_data(setup.data_sharding, batch['mask']), tiled=True
      )
      keep = np.asarray(batch_mask) > 0
      gates.append(np.asarray(batch_gates)[keep])
      labels.append(np.asarray(batch_labels)[keep])
      collected += int(keep.sum())
      bar.update(min(int(keep.sum()), total - bar.n))
      if collected >= total:
        break
  return np.concatenate(gates)[:total], np.concatenate(labels)[:total]


def run(
  workdir: str,
  *,
  split: str | None = None,
  max_examples: int | None = None,
  out_dir: str | None = None,
  max_embed_examples: int = 2000,
) -> dict[str, Any]:
  """Analyses the gates of the run in `workdir`; returns the analysis dict."""
  if max_examples is not None and max_examples < 1:
    raise UserError(f'--max-examples must be at least 1, got {max_examples}')
  run_dir = procedure.require_checkpoint(workdir)
  config, setup, state, dataset = procedure.load_state(run_dir)
  if not config.model.gated:
    raise UserError(f'{workdir!r} holds a {config.variant} model; analyze needs a gated run')
  split = split or config.data.eval_split
  info = dataset.info
  info.split_size(split)  # a clear error for an unknown split
  _, _, predict_fn = train.compile_steps(setup)
  gates, labels = collect_gates(state, dataset, split, setup, predict_fn, max_examples)
  layout = models.gate_layout(config, info.image_shape)
  stats = describe.describe(config, num_classes=info.num_classes, image_shape=info.image_shape)
  if out_dir is None:
    if '://' in workdir:
      raise UserError('give --out (a local folder) to analyse a run in remote storage')
    out_dir = os.path.join(workdir, 'analysis')
  if jax.process_index() != 0:
    return {}
  result = analysis.analyze(
    gates,
    labels,
    layout,
    out_dir=out_dir,
    model_name=f'{config.name} ({config.variant})',
    split=split,
    backbone_macs=stats['backbone_macs'],
    gater_macs=stats['gater_macs'],
    class_names=list(info.class_names) if info.class_names else None,
    max_embed_examples=max_embed_examples,
    seed=config.seed,
  )
  totals = result['census']['totals']
  print(
    f'Analysed {len(gates)} examples of {split!r}; wrote figures and analysis.json to {out_dir}'
  )
  print('  gates: ' + ', '.join(f'{k} {v}' for k, v in totals.items()))
  per_example = result['gates_per_example']
  print(
    f'  gates on per example: min {per_example["min"]}, mean {per_example["mean"]:.1f}, '
    f'max {per_example["max"]}'
  )
  return result
