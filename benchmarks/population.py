"""What training a population as one program buys: members x training images/s; one JSON line.

  python benchmarks/population.py [--config experiments/cifar10_resnet20.py] [--members 1,2,4,8]
      [--variants plain,gated] [--member_maps sequential,map,vmap] [--steps 6] [--rounds 2]

For each variant, member map (`training/members.py`: 'vmap' one batched program, 'map' one
program looping over the members, 'sequential' each member's own program in turn) and population
size K, the real population dispatch (`members.PopulationDispatch`: each member's batches drawn
on the device from its own example order, augmentation, the gate losses, SGD) trains K members
that differ in their seed and, for the gated variant, in λ (`gating.l1_weight` = 0.1 * (k + 1), so
λ is a traced value as in a λ sweep). Reported per point: the population's training images/s
summed over its members (`members_images_per_s` = K x batch x steps / s), the same per member,
and the compile time. Synthetic uint8 images of the dataset's shape, resident on the devices
(benchmarks/synthetic.py), the platform's steps per dispatch (1 on the CPU, 100 on a GPU or TPU);
each measurement runs `--steps` steps (whole dispatches) after a warm-up, `--rounds` times
interleaved, medians reported. `speedup_vs_k1` is members_images_per_s over K = 1's of the
same variant and map: what one program of K members gains over K runs one after another.
"""

from __future__ import annotations

import sys

from gaternet_jax import environment

environment.prepare()  # the `gaternet` command's settings, before JAX starts

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import synthetic  # noqa: E402 - benchmarks/synthetic.py
from absl import app, flags  # noqa: E402

from gaternet_jax.training import members, steps  # noqa: E402

flags.DEFINE_string('config', 'experiments/cifar10_resnet20.py', 'Experiment config FILE[:arg].')
flags.DEFINE_list('members', ['1', '2', '4', '8'], 'Population sizes K.')
flags.DEFINE_list('variants', ['plain', 'gated'], 'Variants to measure.')
flags.DEFINE_list('member_maps', None, 'Member maps (default: sequential,map,vmap).')
flags.DEFINE_integer('batch_size', None, "Global batch per member (default: the config's).")
flags.DEFINE_integer('steps', 6, 'Timed steps per measurement.')
flags.DEFINE_integer('rounds', 2, 'Interleaved repetitions; medians reported.')
flags.DEFINE_integer('examples', 2048, 'Synthetic training examples.')
FLAGS = flags.FLAGS

WARMUP_STEPS = 2


class Point:
  """K members of one variant under one member map, built and compiled once."""

  def __init__(self, config, variant: str, size: int, member_map: str):
    base = synthetic.variant_config(config, variant, batch_size=FLAGS.batch_size)
    self.batch_size = base.batch_size
    dataset, _, _ = synthetic.resident_dataset(base, FLAGS.examples)
    configs = []
    for k in range(size):
      c = base.copy_and_resolve_references()
      c.seed = k
      if variant == 'gated':
        c.gating.l1_weight = 0.1 * (k + 1)
      configs.append(c)
    setups = [steps.build(c, dataset.info) for c in configs]
    train_setup = setups[0]
    if member_map == 'vmap':
      import dataclasses  # noqa: PLC0415

      train_setup = dataclasses.replace(train_setup, cpu_speedups=False)
    rep = train_setup.replicated
    keys = [jax.random.split(jax.random.key(c.seed), 3) for c in configs]
    self.state = members.stack(
      [steps.create_state(s, k[0]) for s, k in zip(setups, keys, strict=True)], rep
    )
    self.dispatch = members.PopulationDispatch(
      [train_setup, *setups[1:]],
      dataset,
      data_keys=members.stack([k[1] for k in keys], rep),
      keys=members.stack([k[2] for k in keys], rep),
      hyper=jax.device_put(members.member_hyper(setups), rep),
      member_map=member_map,
    )
    self.size, self.step = size, 0
    self.k = self.dispatch.max_steps  # steps per dispatch: the platform's (1 on the CPU)
    start = time.perf_counter()
    self.run(1)
    self.compile_s = time.perf_counter() - start

  def run(self, chunks: int):
    for _ in range(chunks):
      self.state, metrics = self.dispatch(self.state, self.step, self.k)
      self.step += self.k
    jax.block_until_ready((self.state, metrics))

  def images_per_s(self) -> float:
    self.run(max(1, round(WARMUP_STEPS / self.k)))
    chunks = max(1, round(FLAGS.steps / self.k))
    start = time.perf_counter()
    self.run(chunks)
    return self.size * self.batch_size * chunks * self.k / (time.perf_counter() - start)


def main(argv):
  del argv
  config = synthetic.load_config(FLAGS.config)
  maps = FLAGS.member_maps or ['sequential', 'map', 'vmap']
  sizes = [int(k) for k in FLAGS.members]
  points = {(v, m, k): Point(config, v, k, m) for v in FLAGS.variants for m in maps for k in sizes}
  times: dict = {key: [] for key in points}
  for _ in range(FLAGS.rounds):
    for key, p in points.items():
      times[key].append(p.images_per_s())
  result = {
    'config': config.name,
    'device_kind': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    'backend': jax.default_backend(),
    'default_member_map': members.default_member_map(jax.default_backend()),
    'steps': FLAGS.steps,
    'rounds': FLAGS.rounds,
  }
  for (v, m, k), p in points.items():
    total = statistics.median(times[(v, m, k)])
    base = statistics.median(times[(v, m, sizes[0])]) if sizes[0] == 1 else None
    result.setdefault(v, {}).setdefault(m, {})[str(k)] = {
      'members_images_per_s': round(total, 1),
      'per_member_images_per_s': round(total / k, 1),
      'rounds': [round(t, 1) for t in times[(v, m, k)]],
      'compile_s': round(p.compile_s, 2),
      'batch_size': p.batch_size,
      'steps_per_dispatch': p.k,
      **({'speedup_vs_k1': round(total / base, 3)} if base else {}),
    }
  print(json.dumps(result))


if __name__ == '__main__':
  sys.exit(app.run(main))
