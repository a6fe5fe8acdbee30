"""How a trained run's gate probabilities are distributed, against the batch-shaping prior; one JSON
line per run, and a figure.

  python benchmarks/gate_distribution.py --workdir W [--workdir W2 ...] [--split holdout]
      [--out gate_distribution.png]

For each run (a plain locally gated Batch-Shaping run, a GaterNet, or a procedure workdir's joint
stage): every example of `--split` (default: the run's evaluation split) goes through the model in
evaluation mode, and each gate's on-probability is taken as the losses see it
(`binarizers.on_probability`: sigmoid(alpha) for Gumbel gates, Phi(g') for SemHash). Reported:

- `batch_shaping_loss`: the batch-shaping loss against the config's Beta(a, b) prior (Bejnordi et
  al.'s Cramer-von Mises match, mean over gates), over consecutive batches of the run's training
  batch size, averaged: lower is closer to the prior;
- `histogram`: the share of all (example, gate) probabilities in 10 equal bins of [0, 1], beside
  `prior_histogram`, the prior's mass in the same bins, and `total_variation` between the two;
- `input_dependent`: the share of gates that are on for some examples and off for others (hard
  gates, probability > 1/2), `always_on`, `always_off`; `density`: the share of gates on.

The figure (`--out`) overlays each run's histogram on the prior's.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaternet_jax import environment  # noqa: E402

environment.prepare()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gaternet_jax import configs  # noqa: E402
from gaternet_jax.errors import UserError  # noqa: E402
from gaternet_jax.gating import batch_shaping, binarizers  # noqa: E402
from gaternet_jax.training import restore, steps  # noqa: E402

BINS = 10


def probabilities(workdir: str, split: str | None = None) -> tuple[np.ndarray, object]:
  """(examples, gates) on-probabilities of `split` under the run's binarizer, and its config."""
  loaded = restore.load_state(restore.require_checkpoint(workdir))
  config, setup, state = loaded.config, loaded.setup, loaded.state
  if not config.model.gated:
    raise UserError(f'{workdir!r} holds a {configs.variant_of(config)} model: it has no gates')
  images, _ = loaded.dataset.eval_arrays(split or config.data.eval_split)
  binarizer = configs.gating_of(config).binarizer
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  @jax.jit
  def on_probability(x):
    x = steps.preprocess(config, setup.info, x, None)
    _, aux = setup.model.apply(variables, x, train=False)
    return binarizers.on_probability(aux['gate_logits'], binarizer)

  batch = config.eval_batch_size
  chunks = [
    on_probability(jnp.asarray(images[i : i + batch])) for i in range(0, len(images), batch)
  ]
  return np.concatenate([np.asarray(c) for c in chunks]), config


def summarize(p: np.ndarray, config) -> dict:
  """The numbers the module docstring lists, for probabilities `p` (examples, gates)."""
  gating = configs.gating_of(config)
  a, b = float(gating.prior_a), float(gating.prior_b)
  n = min(config.batch_size, len(p))
  losses = [
    float(batch_shaping.batch_shaping_loss(jnp.asarray(p[i : i + n]), a, b))
    for i in range(0, len(p) - n + 1, n)
  ]
  edges = np.linspace(0.0, 1.0, BINS + 1)
  histogram = np.histogram(p.ravel(), bins=edges)[0] / p.size
  cdf = np.asarray(batch_shaping.beta_cdf(jnp.asarray(edges, jnp.float32), a, b, eps=0.0))
  prior = np.diff(cdf)
  on = p > 0.5
  ever_on, ever_off = on.any(axis=0), (~on).any(axis=0)
  return {
    'examples': int(p.shape[0]),
    'gates': int(p.shape[1]),
    'prior': [a, b],
    'batch_shaping_loss': float(np.mean(losses)),
    'loss_batches': len(losses),
    'histogram': [round(float(h), 4) for h in histogram],
    'prior_histogram': [round(float(h), 4) for h in prior],
    'total_variation': float(0.5 * np.abs(histogram - prior).sum()),
    'input_dependent': float(np.mean(ever_on & ever_off)),
    'always_on': float(np.mean(~ever_off)),
    'always_off': float(np.mean(~ever_on)),
    'density': float(on.mean()),
  }


def figure(results: dict[str, dict], path: str) -> None:
  from gaternet_jax.analysis import figures  # noqa: PLC0415 - matplotlib only here

  fig = figures._new_figure(6.4, 3.6)  # noqa: SLF001
  ax = fig.add_subplot()
  centres = (np.arange(BINS) + 0.5) / BINS
  first = next(iter(results.values()))
  ax.plot(
    centres, first['prior_histogram'], 'k--', marker='o', label=f'Beta{tuple(first["prior"])}'
  )
  width = 0.8 / BINS / max(1, len(results))
  for i, (name, r) in enumerate(results.items()):
    offset = (i - (len(results) - 1) / 2) * width
    ax.bar(
      centres + offset, r['histogram'], width=width, label=f'{name} (TV {r["total_variation"]:.2f})'
    )
  ax.set_xlabel('gate on-probability')
  ax.set_ylabel('share of (example, gate) pairs')
  ax.legend(fontsize=7)
  figures.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', action='append', required=True)
  parser.add_argument('--split', default=None)
  parser.add_argument('--out', default=None, help='the figure (PNG); none when omitted')
  args = parser.parse_args(argv)
  results = {}
  for workdir in args.workdir:
    p, config = probabilities(workdir, args.split)
    results[workdir] = summarize(p, config)
    print(json.dumps({'workdir': workdir, **results[workdir]}))
  if args.out:
    figure(results, args.out)


if __name__ == '__main__':
  main()
