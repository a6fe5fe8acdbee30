"""The member axis of a population (training/population.py): its values, state and dispatch.

A population's members share one model and shapes and differ only in numbers the training step
reads (`steps.train_step`'s `hyper`), their random keys and their example orders. `member_hyper`
makes the numbers that differ traced arrays; `stack` / `member` put states on and off a leading
member axis; `PopulationDispatch` advances every member by `n` steps, drawing each member's
batches from its own order (`feed.MemberOrders`), as `dispatch.TrainDispatch` does for one run;
`write_member` writes a member out as an ordinary finished run, `copy_finished_run` copies one.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gaternet_jax import configs, cpu
from gaternet_jax.data import feed
from gaternet_jax.training import checkpoints, dispatch, distributed, loop, losses, steps
from gaternet_jax.training import workdir as workdir_lib

MEMBER_MAPS = ('vmap', 'map', 'sequential')


def default_member_map(platform: str) -> str:
  """'vmap' (one batched program) off the CPU; on it 'sequential' (each member's own program in
  turn), whose numbers are bit-identical to runs alone. There 'vmap' traces XLA's convolutions
  (the native ones have no batching rule) and ran at 0.46x; 'map' ran 1.0-1.08x of sequential
  (2026-12-06, docs/performance.md) but its loop body compiles differently, so its numbers drift
  from a run alone's by float rounding."""
  return 'sequential' if platform == 'cpu' else 'vmap'


def member_hyper(setups: Sequence[steps.Setup]) -> dict[str, np.ndarray]:
  """The step's traced values (`steps.train_step`'s `hyper`) that differ between members, as
  float32 (members,) arrays; a value every member shares stays the config's constant."""
  values = {
    steps.PEAK_LEARNING_RATE: [s.plan.learning_rate for s in setups],
    steps.GATE_DROPOUT_RATE: [float(s.config.gater.dropout_rate) for s in setups],
  }
  for field in losses.WEIGHT_FIELDS.values():
    leaf = field.split('.')[-1]
    values[field] = [float(configs.gating_of(s.config)[leaf]) for s in setups]
  return {k: np.asarray(v, np.float32) for k, v in values.items() if len(set(v)) > 1}


def member(tree: Any, k: int) -> Any:
  """Member `k` of a stacked tree."""
  return jax.tree.map(lambda x: x[k], tree)


def stack(trees: Sequence[Any], sharding: NamedSharding) -> Any:
  """Trees of equal structure as one tree with a leading member axis, placed on `sharding`."""
  return jax.jit(lambda *ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts), out_shardings=sharding)(
    *trees
  )


class PopulationDispatch:
  """`(state, step, n) -> (state, metrics)` for a stacked state: `dispatch.TrainDispatch` with a
  member axis. Metrics are (max_steps, members) arrays.

  'vmap' and 'map' run every member in one program (batched, or a loop over the member axis);
  'sequential' runs each member's step with exactly the program it would have alone (its own
  config's constants, `dispatch.TrainDispatch`'s chunk), one call per member, so its numbers are
  bit-identical to a run alone's.
  """

  def __init__(self, setups, dataset, *, data_keys, keys, hyper, member_map: str):
    setup = setups[0]
    config = setup.config
    self.max_steps = dispatch.steps_per_dispatch(config, dataset.info)
    images, labels = dataset.train_arrays()
    self.resident = feed.MemberOrders(
      images,
      labels,
      num_train=dataset.info.num_train,
      batch_size=config.batch_size,
      sharding=setup.data_sharding,
      keys=data_keys,
    )
    self.chunk_epochs = (self.max_steps - 2) // self.resident.steps_per_epoch + 2
    self.sequential = member_map == 'sequential'
    self.keys, self.hyper = keys, hyper
    rep = setup.replicated
    if self.sequential:
      # Members whose configs differ only in the seed share one program (and one compilation).
      distinct: dict[str, int] = {}
      self.program_of = [distinct.setdefault(_program_key(s.config), len(distinct)) for s in setups]
      firsts = [self.program_of.index(i) for i in range(len(distinct))]
      programs = [
        functools.partial(dispatch.resident_step, setup=setups[k], resident=self.resident)
        for k in firsts
      ]
      orders_sharding = NamedSharding(setup.mesh, P(None, *setup.data_sharding.spec))
      key_sharding = rep
    else:
      member_step = functools.partial(dispatch.resident_step, setup=setup, resident=self.resident)
      programs = [
        functools.partial(_population_step, member_step=member_step, member_map=member_map)
      ]
      orders_sharding = self.resident.orders_sharding
      key_sharding = (rep, rep)
    self._chunks = [
      jax.jit(
        self._chunk_of(one_step),
        in_shardings=(
          rep,
          setup.data_sharding,
          setup.data_sharding,
          orders_sharding,
          rep,
          key_sharding,
          rep,
        ),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
        compiler_options=cpu.compiler_options(steps.platform(setup), 'train'),
      )
      for one_step in programs
    ]

  def _chunk_of(self, one_step):
    if self.max_steps == 1:
      return functools.partial(dispatch.single_step_chunk, one_step=one_step)
    return functools.partial(dispatch.loop_chunk, one_step=jax.jit(one_step), size=self.max_steps)

  def __call__(self, state, step: int, n: int):
    if not 1 <= n <= self.max_steps:
      raise ValueError(f'a dispatch runs 1 to {self.max_steps} steps, asked for {n}')
    r = self.resident
    first_epoch = jnp.int32(step // r.steps_per_epoch)
    orders = r.orders(step // r.steps_per_epoch, self.chunk_epochs)
    if not self.sequential:
      args = (r.images, r.labels, orders, first_epoch, (self.keys, self.hyper), jnp.int32(n))
      return self._chunks[0](state, *args)
    outputs = [
      self._chunks[program](
        member(state, k), r.images, r.labels, orders[k], first_epoch, self.keys[k], jnp.int32(n)
      )
      for k, program in enumerate(self.program_of)
    ]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(o[0] for o in outputs))
    metrics = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *(o[1] for o in outputs))
    return stacked, metrics


def _program_key(config) -> str:
  """What a member's own program depends on: its config but the seed (a traced key)."""
  return json.dumps({k: v for k, v in configs.flatten(config).items() if k != 'seed'}, default=str)


def _population_step(
  state, images, labels, orders, first_epoch, member_args, *, member_step, member_map
):
  """Every member's step: (stacked state, per-member metrics)."""
  keys, hyper = member_args
  if member_map == 'vmap':
    return jax.vmap(member_step, in_axes=(0, None, None, 0, None, 0, 0))(
      state, images, labels, orders, first_epoch, keys, hyper
    )

  def one(args):
    s, o, k, h = args
    return member_step(s, images, labels, o, first_epoch, k, h)

  return jax.lax.map(one, (state, orders, keys, hyper))


def write_member(config, workdir: str, setup: steps.Setup, state, step: int, wall: float, results):
  """One member as an ordinary finished run: config, plan, final checkpoint, results."""
  if distributed.is_leader():
    workdir_lib.save_config(config, workdir)
    plan = dict(loop.plan_record(setup), elapsed_s=round(wall, 2))
    workdir_lib.write_json(workdir, workdir_lib.PLAN_FILE, plan)
  manager = checkpoints.make_manager(workdir, keep=config.keep_checkpoints)
  if step not in distributed.agree_json(
    lambda: checkpoints.steps(workdir)
  ):  # else written before a kill
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, setup.abstract_state))
    checkpoints.save(manager, workdir, step, state)
  checkpoints.finish(manager, workdir, step)
  loop.write_results(workdir, results)


def copy_finished_run(source: str, target: str, config) -> None:
  """`source`'s files into `target`, with `config` as its config.json; results.json last, so that
  an interrupted copy is not a finished run (it is copied again)."""
  src, dst = workdir_lib.path(source), workdir_lib.path(target)

  def walk(folder):  # (epath has no recursive glob for cloud storage)
    for entry in folder.iterdir():
      yield from walk(entry) if entry.is_dir() else [entry]

  files = [f for f in walk(src) if f.name != workdir_lib.LOCK_FILE]
  files.sort(key=lambda f: f.name == workdir_lib.RESULTS_FILE)
  for f in files:
    relative = os.path.relpath(os.fspath(f), os.fspath(src))
    out = dst / relative
    out.parent.mkdir(parents=True, exist_ok=True)
    if f.name == workdir_lib.RESULTS_FILE:
      workdir_lib.save_config(config, target)
    out.write_bytes(f.read_bytes())
