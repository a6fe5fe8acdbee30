"""Inference speed of a trained GaterNet, its export and its plain backbone; one JSON line.

  python benchmarks/inference.py --workdir W [--export DIR] [--batch_size 256] [--rounds 5]
      [--latency_calls 200]

Times the evaluation-mode forward pass (normalisation, gater, backbone; logits to the host) of:
  - `gaternet`: the trained run in W (every filter computed, the gates multiply);
  - `export`: its export (default W/export, written by `gaternet export`), if present;
  - `plain`: the same backbone without gates (the backbone's weights, no gater);
  - `gaternet_skip`, `export_skip`: the same models skipping every unit whose gates are all off
    for the whole batch (`models.with_unit_skipping`, ResNet backbones; same outputs);
  - `skip_bound` (batch 1 only): the gater and, in the same call, the backbone pruned to exactly
    the filters one image turned on. It is what a per-image skipping path could at best achieve
    (no gather of kernels, no branch on the gates), so if it is not faster than `gaternet`, no
    skipping path can be.
Images come from the run's evaluation split (real images, so the gates are the model's own).
Throughput: images/s at `--batch_size` (each round times `--steps` batches of every model, the
models taking turns batch by batch), median over `--rounds` rounds (every round listed in
`round_images_per_s`); `vs_gaternet`: per model, its images/s over the GaterNet's in the same
round (paired, so a machine that speeds up or slows down between rounds cancels out): median, min,
max and the number of rounds it was `faster`.
Latency: the median of `--latency_calls` batch-1 calls (milliseconds) on the first image, measured
round-robin over the models (`latency_ms`), and on the batch's images in turn, which leave different
units off (`latency_ms_images`; every model but `skip_bound`, which is pruned for the first image);
`latency_vs_gaternet`, `latency_images_vs_gaternet`: per model, the median, min and max over calls
of its latency over the GaterNet's in the same turn, and the number of turns it was `faster`.
"""

from __future__ import annotations

import os

from gaternet_jax import environment

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from gaternet_jax import models
from gaternet_jax.commands import describe, export  # noqa: E402
from gaternet_jax.errors import UserError  # noqa: E402
from gaternet_jax.layout import layer_offsets  # noqa: E402
from gaternet_jax.models.gaternet import Classifier  # noqa: E402
from gaternet_jax.training import restore, steps
from gaternet_jax.training import workdir as workdir_lib  # noqa: E402

flags.DEFINE_string('workdir', None, 'A trained gated run (or procedure workdir).', required=True)
flags.DEFINE_string('export', None, 'Its export (default: WORKDIR/export, if it exists).')
flags.DEFINE_integer('batch_size', 256, 'Batch of the throughput measurement.')
flags.DEFINE_integer('rounds', 5, 'Throughput rounds (interleaved over the models); median.')
flags.DEFINE_integer('steps', 10, 'Batches per throughput round.')
flags.DEFINE_integer('latency_calls', 200, 'Batch-1 calls per model; median reported.')
FLAGS = flags.FLAGS


def _forward(model, config, info):
  def run(variables, images):
    x = steps.preprocess(config, info, images, None)
    return model.apply(variables, x, train=False)[0]

  return jax.jit(run)


def _images(dataset, split: str, n: int) -> np.ndarray:
  batch = next(iter(dataset.eval_iterator(split, n)))
  return np.asarray(batch['image'][:n])


def _per_image_model(loaded, image: np.ndarray):
  """The backbone pruned to the filters `image` turns on (ungated), its variables, gates on."""
  config, info = loaded.config, loaded.setup.info
  variables = {'params': loaded.state.params, 'batch_stats': loaded.state.batch_stats}
  x = steps.preprocess(config, info, jnp.asarray(image[None]), None)
  gates = np.asarray(loaded.setup.model.apply(variables, x, train=False)[1]['gates']) > 0.5
  layout = models.gate_layout(config, info.image_shape)
  plan, _, _ = export.plan_from_gates(gates, layout)  # one image: every gate on or off
  pruned_config = export.export_config(config, plan, gated=False)
  model = models.create_model(
    pruned_config, num_classes=info.num_classes, image_shape=info.image_shape
  )
  target = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  cut = export.prune_tree(jax.device_get(variables), target, plan, np.zeros(0, np.int64))
  return model, cut, int(gates.sum()), gates.shape[1]


def _units_on(loaded, images: np.ndarray) -> tuple[np.ndarray, int]:
  """Per image, how many gated units have a gate on; and how many units are gated."""
  config, info = loaded.config, loaded.setup.info
  variables = {'params': loaded.state.params, 'batch_stats': loaded.state.batch_stats}
  x = steps.preprocess(config, info, jnp.asarray(images), None)
  gates = np.asarray(loaded.setup.model.apply(variables, x, train=False)[1]['gates']) > 0.5
  starts = layer_offsets(models.gate_layout(config, info.image_shape))[:-1]
  per_unit = np.logical_or.reduceat(gates, starts, axis=1)
  return per_unit.sum(axis=1), per_unit.shape[1]


def _add_skipping(timed, name, model, config, info, variables) -> None:
  """Adds `model` skipping its all-off units, where it can (a GaterNet of a ResNet)."""
  try:
    skipping = models.with_unit_skipping(model)
  except UserError:
    return
  timed[name] = (_forward(skipping, config, info), variables)


def _paired(values: list[float], reference: list[float], faster) -> dict:
  """Median, min and max of per-turn ratios, and the turns `faster(ratio)` held."""
  ratios = [v / r for v, r in zip(values, reference, strict=True)]
  summary = {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios)}
  summary = {k: round(v, 3) for k, v in summary.items()}
  return {**summary, 'faster': f'{sum(map(faster, ratios))}/{len(ratios)}'}


def main(argv):
  del argv
  loaded = restore.load_state(restore.require_checkpoint(FLAGS.workdir))
  config, setup, state = loaded.config, loaded.setup, loaded.state
  if not config.model.gated:
    raise app.UsageError(f'{FLAGS.workdir} holds a plain model; give a gated run')
  info = setup.info
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  models_to_time = {'gaternet': (_forward(setup.model, config, info), variables)}
  _add_skipping(models_to_time, 'gaternet_skip', setup.model, config, info, variables)
  export_dir = FLAGS.export or workdir_lib.join(FLAGS.workdir, export.EXPORT_DIR)
  if workdir_lib.exists(export_dir, export.EXPORT_FILE):
    exported = restore.load_state(export_dir, info=info)
    ev = {'params': exported.state.params, 'batch_stats': exported.state.batch_stats}
    models_to_time['export'] = (_forward(exported.setup.model, exported.config, info), ev)
    _add_skipping(models_to_time, 'export_skip', exported.setup.model, exported.config, info, ev)
  plain_config = describe.plain_backbone_config(config)
  plain = Classifier(models.backbone_from_config(plain_config, num_classes=info.num_classes))
  pv = {'params': {'backbone': state.params['backbone']},
        'batch_stats': {'backbone': state.batch_stats['backbone']}}  # fmt: skip
  models_to_time['plain'] = (_forward(plain, plain_config, info), pv)

  images = _images(loaded.dataset, config.data.eval_split, FLAGS.batch_size)
  one = images[:1]
  throughput: dict[str, list[float]] = {name: [] for name in models_to_time}
  for name, (fn, v) in models_to_time.items():  # compile and warm up
    jax.block_until_ready(fn(v, images))
    jax.block_until_ready(fn(v, one))
  for _ in range(FLAGS.rounds):
    # Batches alternate between the models, so a slow spell of a shared machine falls on all of
    # them alike and the per-round ratios compare like with like.
    seconds = dict.fromkeys(models_to_time, 0.0)
    for _ in range(FLAGS.steps):
      for name, (fn, v) in models_to_time.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(v, images))
        seconds[name] += time.perf_counter() - start
    for name, spent in seconds.items():
      throughput[name].append(FLAGS.steps * len(images) / spent)

  # Batch 1: the skipping bound is the gater and the per-image pruned backbone in one call.
  skip_model, skip_vars, on, total = _per_image_model(loaded, images[0])

  def skip_bound(v, im):
    x = steps.preprocess(config, info, im, None)
    gate_logits = setup.model.gater.apply(v['gater'], x, train=False)
    logits = skip_model.apply(v['backbone'], x, train=False)[0]
    return logits, gate_logits > 0  # the gates a skipping kernel would dispatch on

  gv = {'params': state.params['gater'], 'batch_stats': state.batch_stats['gater']}
  timed = dict(models_to_time)
  timed['skip_bound'] = (jax.jit(skip_bound), {'gater': gv, 'backbone': skip_vars})
  latency: dict[str, list[float]] = {name: [] for name in timed}
  for fn, v in timed.values():
    jax.block_until_ready(fn(v, one))
  for _ in range(FLAGS.latency_calls):
    for name, (fn, v) in timed.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(v, one))
      latency[name].append(1e3 * (time.perf_counter() - start))
  latency_images: dict[str, list[float]] = {name: [] for name in models_to_time}
  for call in range(FLAGS.latency_calls):
    image = images[call % len(images)][None]
    for name, (fn, v) in models_to_time.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(v, image))
      latency_images[name].append(1e3 * (time.perf_counter() - start))

  units_on, units = _units_on(loaded, images)
  med = {name: statistics.median(values) for name, values in latency.items()}
  others = [name for name in timed if name != 'gaternet']
  vs_gaternet = {  # images/s over the GaterNet's in the same round: above 1 is faster
    name: _paired(throughput[name], throughput['gaternet'], lambda r: r > 1)
    for name in others
    if name in throughput
  }

  def latency_ratios(measured):  # ms over the GaterNet's in the same turn: below 1 is faster
    return {
      name: _paired(measured[name], measured['gaternet'], lambda r: r < 1)
      for name in others
      if name in measured
    }

  result = {
    'workdir': FLAGS.workdir,
    'device_kind': jax.devices()[0].device_kind,
    'backend': jax.default_backend(),
    'batch_size': len(images),
    'images_per_s': {k: round(statistics.median(v), 1) for k, v in throughput.items()},
    'round_images_per_s': {k: [round(x, 1) for x in v] for k, v in throughput.items()},
    'vs_gaternet': vs_gaternet,
    'latency_ms': {k: round(v, 3) for k, v in med.items()},
    'latency_vs_gaternet': latency_ratios(latency),
    'latency_ms_images': {k: round(statistics.median(v), 3) for k, v in latency_images.items()},
    'latency_images_vs_gaternet': latency_ratios(latency_images),
    'skip_bound_image_gates_on': f'{on}/{total}',
    # Units with a gate on: what a skipping model computes, of every gated unit.
    'units_on_first_image': f'{units_on[0]}/{units}',
    'units_on_per_image_mean': round(float(units_on.mean()), 2),
    'rounds': FLAGS.rounds,
    'latency_calls': FLAGS.latency_calls,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
