"""`gaternet analyze`: run a trained GaterNet over a split and analyse its gates (section 4.2.1).

Restores the latest checkpoint of a workdir with its stored config, collects every example's binary
gate vector in evaluation mode (data-parallel, like evaluation), and hands them to `analyze`, which
writes the census, histograms, t-SNE, per-class usage, compute-used numbers, figures,
`analysis.json` and `gates.npz`.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from gaternet_jax import configs, models
from gaternet_jax.analysis import analyze
from gaternet_jax.commands import describe
from gaternet_jax.data import feed
from gaternet_jax.errors import UserError
from gaternet_jax.training import distributed, restore, steps
from gaternet_jax.training import workdir as workdir_lib


def predicted_batches(
  state, dataset, split: str, setup, predict_fn, max_examples: int | None, keys=('logits', 'gates')
) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation-mode outputs of the first `max_examples` examples of `split`, one batch at a
  time, on every host: the padding dropped, `label` and the `keys` asked for (of `logits` and,
  for a gated model, binary `gates`), so a whole split never has to fit in memory at once."""
  total = dataset.info.split_size(split)
  if max_examples is not None:
    total = min(total, max_examples)
  local_batch = setup.config.eval_batch_size // jax.process_count()
  collected = 0

  def gather(array):
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))

  with tqdm.tqdm(
    total=total, desc=f'predicting {split}', unit='img', disable=not distributed.is_leader()
  ) as bar:
    for batch in dataset.eval_iterator(split, local_batch):
      out = predict_fn(state, feed.to_global(batch, setup.data_sharding))
      local = {k: batch[k] for k in ('label', 'mask')}
      rows = feed.to_global(local, setup.data_sharding)
      keep = gather(rows['mask']) > 0
      wanted = {k: v for k, v in out.items() if k in keys}
      take = min(int(keep.sum()), total - collected)
      yield {k: gather(v)[keep][:take] for k, v in {**wanted, 'label': rows['label']}.items()}
      collected += take
      bar.update(take)
      if collected >= total:
        break


def predict_split(
  state, dataset, split: str, setup, predict_fn, max_examples: int | None, keys=('logits', 'gates')
) -> dict[str, np.ndarray]:
  """`predicted_batches` of a whole split (or its first `max_examples`), concatenated."""
  parts: dict[str, list[np.ndarray]] = {}
  for out in predicted_batches(state, dataset, split, setup, predict_fn, max_examples, keys):
    for key, value in out.items():
      parts.setdefault(key, []).append(value)
  return {key: np.concatenate(values) for key, values in parts.items()}


def collect_gates(
  state, dataset, split: str, setup, predict_fn, max_examples: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """Binary gates (n, c) and labels (n,) of the first `max_examples` examples of `split`."""
  out = predict_split(state, dataset, split, setup, predict_fn, max_examples, keys=('gates',))
  return out['gates'], out['label']


def analyze_workdir(
  workdir: str,
  *,
  split: str | None = None,
  max_examples: int | None = None,
  out_dir: str | None = None,
  max_embed_examples: int = 2000,
) -> dict[str, Any]:
  """Analyses the gates of the run in `workdir`; writes to `out_dir` (default WORKDIR/analysis).

  Returns the analysis dict on process 0 and {} on the others.
  """
  if max_examples is not None and max_examples < 1:
    raise UserError(f'--max_examples must be at least 1, got {max_examples}')
  if max_embed_examples is not None and max_embed_examples < 0:
    raise UserError(
      f'--max_embed_examples must be at least 0 (0: no t-SNE), got {max_embed_examples}'
    )
  directory = restore.require_checkpoint(workdir)
  config, setup, state, dataset, _ = restore.load_state(directory)
  if not config.model.gated:
    raise UserError(
      f'{workdir!r} holds a {configs.variant_of(config)} model; analyze needs a gated run'
    )
  split = split or config.data.eval_split
  info = dataset.info
  info.split_size(split, '--split')  # a clear error for an unknown --split
  _, _, predict_fn = steps.compile_steps(setup)
  gates, labels = collect_gates(state, dataset, split, setup, predict_fn, max_examples)
  if not distributed.is_leader():
    return {}
  stats = describe.describe(config, num_classes=info.num_classes, image_shape=info.image_shape)
  return analyze(
    gates,
    labels,
    models.gate_layout(config, info.image_shape),
    out_dir=out_dir or workdir_lib.path(workdir, workdir_lib.ANALYSIS_DIR),
    model_name=f'{config.name} ({configs.variant_of(config)})',
    split=split,
    backbone_macs=stats['backbone_macs'],
    gater_macs=stats['gater_macs'],
    class_names=list(info.class_names) if info.class_names else None,
    max_embed_examples=max_embed_examples,
    seed=config.seed,
  )


def format_text(result: dict[str, Any], out_dir: str) -> str:
  """The summary `gaternet analyze` prints."""
  totals = result['census']['totals']
  per_example = result['gates_per_example']
  return '\n'.join(
    [
      f'Analysed {result["num_examples"]} examples of {result["split"]!r}; wrote figures and '
      f'analysis.json to {out_dir}',
      '  gates: ' + ', '.join(f'{k} {v}' for k, v in totals.items()),
      f'  gates on per example: min {per_example["min"]}, mean {per_example["mean"]:.1f}, '
      f'max {per_example["max"]}',
    ]
  )
