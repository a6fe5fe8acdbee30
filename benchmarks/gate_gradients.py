"""Why a GaterNet's gates close: SemHash's dead zone and the forces on FC2's bias; one JSON line.

  python benchmarks/gate_gradients.py --workdir RUN [--batches 8] [--split train]

On a trained gated run (a GaterNet; its joint stage when RUN is a procedure workdir), over
`--batches` batches of the split in training mode (noise, the alpha/beta mix, batch statistics,
no augmentation), it reports:

- the gate logits g' and how many gates sit in Improved SemHash's zero-gradient zone. The
  saturating sigmoid 1.2 sigmoid(x) - 0.1 is clipped to 0 below x = -ln 11 = -2.398 and to 1 above
  +2.398, and the backward pass of both gate kinds is its gradient (gaternet_jax/gating/semhash.py): a
  noisy logit g' + eps past either end sends no gradient from any loss term. Reported: the share of
  (example, gate) pairs whose noiseless g' is below -2.398 (closed for good unless the noise lifts
  it), the expected share of noisy logits in the zone, P(g' + eps < -2.398) + P(g' + eps > 2.398)
  with eps ~ N(0, 1), and the share of gates (columns) whose logit is below -2.398 on every example;
- the gradients that reach FC2's bias (the +init_bias that opens every gate at the start) from
  the cross-entropy and from the L1 term separately, averaged over the batches: their mean over
  the gates and the share of gates where each pushes the bias down (towards closing), and the
  gradient weight decay adds (weight_decay * bias), as a descent direction too;
- the gate density (the mean of the hard gates g_b in evaluation, over the same examples).

A test runs it on the embedded default (tests/test_benchmarks.py). It measures; it changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaternet_jax import environment  # noqa: E402

environment.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.scipy.special import ndtr  # noqa: E402

from gaternet_jax import configs  # noqa: E402
from gaternet_jax.errors import UserError  # noqa: E402
from gaternet_jax.models.gaternet import GaterNet  # noqa: E402
from gaternet_jax.training import losses, restore, steps  # noqa: E402

DEAD_BELOW = -math.log(11.0)  # 1.2 sigmoid(x) - 0.1 = 0
DEAD_ABOVE = math.log(11.0)  # 1.2 sigmoid(x) - 0.1 = 1


def measure(workdir: str, batches: int = 8, split: str = 'train', seed: int = 0) -> dict:
  loaded = restore.load_state(restore.require_checkpoint(workdir))
  config, setup, state = loaded.config, loaded.setup, loaded.state
  if not isinstance(setup.model, GaterNet):
    raise UserError(f'{workdir!r} holds no GaterNet (a gater and a gated backbone)')
  if split == 'train':
    images, labels = loaded.dataset.train_arrays()
  else:
    images, labels = loaded.dataset.eval_arrays(split)
  batch_size = min(config.batch_size, len(images))
  n = min(batches, len(images) // batch_size)
  weight = float(configs.gating_of(config).l1_weight)

  def pieces(params, x, y, key):
    (logits, aux), _ = setup.model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      x,
      train=True,
      rngs={'gates': key},
      mutable=['batch_stats'],
    )
    return losses.cross_entropy(logits, y), losses.gate_l1(aux['gates'], weight), aux

  def grads(params, x, y, key):
    ce = jax.grad(lambda p: pieces(p, x, y, key)[0])(params)
    l1 = jax.grad(lambda p: pieces(p, x, y, key)[1])(params)
    return ce['gater']['fc2']['bias'], l1['gater']['fc2']['bias']

  def eval_gates(x):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return setup.model.apply(variables, x, train=False)[1]

  grads = jax.jit(grads)
  eval_gates = jax.jit(eval_gates)
  ce_sum, l1_sum, logits_all, hard_all = 0.0, 0.0, [], []
  for b in range(n):
    chunk = slice(b * batch_size, (b + 1) * batch_size)
    x = steps.preprocess(config, setup.info, jnp.asarray(images[chunk]), None)
    y = jnp.asarray(labels[chunk])
    ce_grad, l1_grad = grads(state.params, x, y, jax.random.key(seed + b))
    ce_sum, l1_sum = ce_sum + np.asarray(ce_grad), l1_sum + np.asarray(l1_grad)
    aux = eval_gates(x)
    logits_all.append(np.asarray(aux['gate_logits']))
    hard_all.append(np.asarray(aux['gates']))
  g = np.concatenate(logits_all)  # (examples, c): noiseless logits, running statistics
  ce_grad, l1_grad = ce_sum / n, l1_sum / n
  bias = np.asarray(state.params['gater']['fc2']['bias'])
  decay = float(config.optimizer.weight_decay) * bias
  # P(g' + eps past either end), eps ~ N(0, 1), in one vectorised call per end.
  in_zone = np.asarray(ndtr(DEAD_BELOW - g) + ndtr(g - DEAD_ABOVE))
  return {
    'workdir': workdir,
    'step': int(loaded.step),
    'l1_weight': weight,
    'weight_decay': float(config.optimizer.weight_decay),
    'examples': int(g.shape[0]),
    'gates': int(g.shape[1]),
    'gate_density': float(np.mean(np.concatenate(hard_all))),
    'gate_logit': {
      'mean': float(g.mean()),
      'quantiles': {str(q): float(np.quantile(g, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
    },
    'dead_zone': {
      'below_share': float(np.mean(g < DEAD_BELOW)),
      'expected_noisy_share': float(np.mean(in_zone)),
      'gates_below_on_every_example': float(np.mean(np.all(g < DEAD_BELOW, axis=0))),
    },
    'fc2_bias': {
      'mean': float(bias.mean()),
      # Gradients of the loss: positive pushes the bias down under gradient descent.
      'cross_entropy_grad_mean': float(ce_grad.mean()),
      'cross_entropy_closing_share': float(np.mean(ce_grad > 0)),
      'l1_grad_mean': float(l1_grad.mean()),
      'l1_closing_share': float(np.mean(l1_grad > 0)),
      'weight_decay_grad_mean': float(decay.mean()),
      'abs_mean': {
        'cross_entropy': float(np.abs(ce_grad).mean()),
        'l1': float(np.abs(l1_grad).mean()),
        'weight_decay': float(np.abs(decay).mean()),
      },
    },
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--batches', type=int, default=8)
  parser.add_argument('--split', default='train')
  args = parser.parse_args(argv)
  try:
    result = measure(args.workdir, args.batches, args.split)
  except UserError as e:
    print(f'gate_gradients: error: {e}', file=sys.stderr)
    raise SystemExit(2) from None
  print(json.dumps(result))


if __name__ == '__main__':
  main()
