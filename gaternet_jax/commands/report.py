"""`gaternet report`: a Markdown table of finished runs, laid out like the paper's Tables 1 and 3.

Each workdir's `results.json` (written at the end of training) gives our parameters, gated filters
and error; the paper's numbers for the same row stand beside them.
"""

from __future__ import annotations

import os
import re
from typing import Any

from gaternet_jax.errors import UserError
from gaternet_jax.training import workdir as workdir_lib

VARIANT_SUFFIX = {
  'plain': '',
  'wider': '-Wider',
  'se': '-SE',
  'gated': '-Gated',
  'bas': '-BaS',  # Batch-Shaping's locally gated units
  'gaternet_bas': '-Gated+BaS',  # a GaterNet trained with the batch-shaping loss too
}

# (dataset, depth, variant) -> (parameters in millions, error %) from Table 1, and
# ('imagenet2012', depth, variant) -> (parameters, top-1 %, top-5 %) from Table 3.
PAPER = {
  ('cifar10', 20, 'plain'): (0.27, 8.06),
  ('cifar10', 20, 'wider'): (0.56, 6.85),
  ('cifar10', 20, 'se'): (0.28, 7.81),
  ('cifar10', 20, 'gated'): (0.55, 6.88),
  ('cifar10', 56, 'plain'): (0.86, 6.74),
  ('cifar10', 56, 'wider'): (1.08, 6.72),
  ('cifar10', 56, 'se'): (0.88, 6.27),
  ('cifar10', 56, 'gated'): (1.14, 5.72),
  ('cifar10', 164, 'plain'): (1.62, 5.61),
  ('cifar10', 164, 'wider'): (2.04, 5.57),
  ('cifar10', 164, 'se'): (2.00, 5.51),
  ('cifar10', 164, 'gated'): (1.96, 4.80),
  ('cifar100', 20, 'plain'): (0.28, 32.39),
  ('cifar100', 20, 'wider'): (0.57, 30.08),
  ('cifar100', 20, 'se'): (0.29, 31.22),
  ('cifar100', 20, 'gated'): (0.60, 30.79),
  ('cifar100', 56, 'plain'): (0.86, 28.87),
  ('cifar100', 56, 'wider'): (1.09, 28.39),
  ('cifar100', 56, 'se'): (0.89, 28.00),
  ('cifar100', 56, 'gated'): (1.14, 27.71),
  ('cifar100', 164, 'plain'): (1.64, 25.39),
  ('cifar100', 164, 'wider'): (2.07, 24.80),
  ('cifar100', 164, 'se'): (2.02, 23.83),
  ('cifar100', 164, 'gated'): (1.98, 23.56),
  ('imagenet2012', 34, 'plain'): (21.80, 26.56, 8.48),
  ('imagenet2012', 34, 'wider'): (33.89, 25.36, 7.91),
  ('imagenet2012', 34, 'se'): (21.96, 26.08, 8.30),
  ('imagenet2012', 34, 'gated'): (34.08, 26.04, 8.34),
  ('imagenet2012', 101, 'plain'): (44.55, 23.36, 6.56),
  ('imagenet2012', 101, 'wider'): (59.17, 21.89, 6.05),
  ('imagenet2012', 101, 'se'): (49.33, 22.38, 6.07),
  ('imagenet2012', 101, 'gated'): (64.21, 21.51, 5.78),
  ('imagenet2012', 152, 'plain'): (60.19, 22.34, 6.22),
  ('imagenet2012', 152, 'wider'): (81.37, 21.50, 5.67),
  ('imagenet2012', 152, 'se'): (66.82, 21.57, 5.73),
  ('imagenet2012', 152, 'gated'): (83.80, 21.19, 5.45),
}


def load_results(workdir: str) -> dict[str, Any]:
  if not workdir_lib.is_finished(workdir):
    raise UserError(f'{workdir!r} has no results.json (unfinished or not a gaternet run)')
  return workdir_lib.read_results(workdir)


def write_table(path: str, table: str) -> None:
  """Writes the Markdown table to `path` (local or gs://)."""
  try:
    workdir_lib.path(path).write_text(table + '\n')
  except OSError as e:
    raise UserError(f'cannot write {path!r}: {e.strerror or e}') from None


def _depth(name: str) -> int | None:
  match = re.search(r'resnet(\d+)', name)
  return int(match.group(1)) if match else None


def make_table(workdirs: list[str]) -> str:
  """A Markdown table with one row per workdir, ours next to the paper's where it has the row."""
  rows = []
  for workdir in workdirs:
    r = load_results(workdir)
    depth = _depth(r.get('backbone', r.get('name', '')))
    dataset = r.get('dataset', '')
    paper = PAPER.get((dataset, depth, r.get('variant')))
    model = f'ResNet-{depth}{VARIANT_SUFFIX.get(r.get("variant"), "")}' if depth else r.get('name')
    ev = r.get('eval', {})
    density = ev.get('gate_density')
    rows.append(
      [
        model,
        dataset,
        f'{r["gated_filters"]:,}' if r.get('gated_filters') else '-',
        f'{r["params"] / 1e6:.2f}M' if 'params' in r else '?',
        f'{ev.get("top1_error", float("nan")):.2f}',
        f'{ev.get("top5_error", float("nan")):.2f}' if dataset == 'imagenet2012' else '',
        f'{density:.3f}' if density is not None else '-',
        f'{r.get("split", "?")} ({ev.get("examples", "?")})',
        str(r.get('step', '?')),
        f'{paper[0]:.2f}M' if paper else '-',
        f'{paper[1]:.2f}' if paper else '-',
        os.path.normpath(workdir),
      ]
    )
  header = [
    'Model',
    'Data',
    'Gated filters',
    'Params (ours)',
    'Top-1 err % (ours)',
    'Top-5 err % (ours)',
    'Gate density',
    'Eval split (n)',
    'Steps',
    'Params (paper)',
    'Top-1 err % (paper)',
    'Workdir',
  ]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)
