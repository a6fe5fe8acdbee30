"""A population of runs trained as one program: a grid of seeds and loss weights in one jit.

The points of a sweep that differ only in numbers the training step reads as values (`VECTORIZED`:
the seed, the gate-loss weights, the learning rate, the gate-dropout rate) share one compiled
program. Parameters, batch statistics, optimizer state, random keys and example orders carry a
leading member axis (training/members.py); on a GPU or TPU the step runs over it with `jax.vmap`,
and each member draws exactly the keys, batches and noise it would draw alone (`loop.run`'s
streams and `feed.ResidentTrainData`'s orders, per member). A member's differing values reach the
step as traced numbers (`steps.train_step`'s `hyper`); values every member shares stay the
config's Python constants, as in a run alone. On the CPU each member runs its own program in
turn by default ('sequential', bit-identical to a run alone; `members.default_member_map` says
why).

The stacked state is checkpointed in `POPULATION_DIR/<stage>/` of the sweep's workdir and resumes
like any run. When the population's stage ends, every member is written out as an ordinary run in
its own directory (config.json, plan.json, its final checkpoint with checksums, TensorBoard events,
results.json), so `evaluate`, `analyze`, `export`, `tradeoff`, `report`, `load_run` and a rerun
without `--vectorize` see a finished run. training/grid.py composes the paper's procedure from
such stages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from gaternet_jax import configs
from gaternet_jax import data as data_lib
from gaternet_jax.errors import Interrupted, NonFiniteLossError, UserError
from gaternet_jax.training import (
  checkpoints,
  dispatch,
  distributed,
  loop,
  losses,
  members,
  metrics_io,
  preemption,
  steps,
)
from gaternet_jax.training import workdir as workdir_lib

# Fields a population's members may differ in: each reaches the training step as a number, so
# every member runs the same program. Anything else (depth, width, batch size, variant, dataset,
# schedule shape, ...) changes shapes or code and is refused.
VECTORIZED = (
  'seed',
  'optimizer.learning_rate',
  'gater.dropout_rate',
  *losses.WEIGHT_FIELDS.values(),
)
# Runs the members start from, one each (e.g. `gaternet reproduce`'s gated run of each seed from
# that seed's plain run): read once into a member's initial state, never by the step.
PER_MEMBER_SOURCES = ('init.backbone', 'init.gater')
# Where the stacked checkpoints live, inside the sweep's workdir.
POPULATION_DIR = 'population'
POPULATION_FILE = 'population.json'


def check_vectorizable(member_configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Refuses (one line) a population whose members differ in a field outside `VECTORIZED`."""
  flat = [configs.flatten(c) for c in member_configs]
  for field in sorted(set().union(*flat)):
    if (
      len({json.dumps(f.get(field), sort_keys=True) for f in flat}) > 1
      and field not in VECTORIZED + PER_MEMBER_SOURCES
    ):
      raise UserError(
        f'--vectorize: the grid varies {field}, which changes the compiled program; only '
        f'{", ".join(VECTORIZED)} can vary in one program (drop --vectorize to train the points '
        'one after another)'
      )
  check_sources(member_configs)


def check_sources(member_configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Refuses `PER_MEMBER_SOURCES` set for some members only: a stage trains for all or none."""
  for field in PER_MEMBER_SOURCES:
    if len({bool(configs.flatten(c).get(field)) for c in member_configs}) > 1:
      raise UserError(f'--vectorize: {field} is set for some points only; set it for all or none')
  rates = [c.gater.dropout_rate for c in member_configs]
  if any(rates) and not all(rates):
    raise UserError(
      '--vectorize: gater.dropout_rate mixes 0 (no dropout mask drawn) with positive rates, '
      'which draw different random numbers; vectorize them separately'
    )


def read_population(pop_dir: str) -> dict | None:
  if not workdir_lib.exists(pop_dir, POPULATION_FILE):
    return None
  return workdir_lib.read_json(pop_dir, POPULATION_FILE)


def _may_resume(stored: dict, record: dict) -> bool:
  """Whether the population `record` describes may resume the `stored` one: the same stage,
  stream and member directories in the same order, each member's config one that could resume
  its run alone (checkpoints.differing_fields). The member map only changes how the members share
  the machine: one begun on a CPU may finish on a GPU."""
  if any(stored.get(k) != record[k] for k in ('stage', 'stream')):
    return False
  pairs = list(zip(stored['members'], record['members']))
  if len(stored['members']) != len(record['members']):
    return False
  return all(
    a['workdir'] == b['workdir']
    and not checkpoints.differing_fields(configs.flatten(a['config']), configs.flatten(b['config']))
    for a, b in pairs
  )


def train_population(
  member_configs: Sequence[ml_collections.ConfigDict],
  member_dirs: Sequence[str],
  pop_dir: str,
  *,
  stage: str | None = None,
  stream: int = 0,
  num_epochs: float | None = None,
  learning_rate: float | None = None,
  initialize: Sequence[Callable[[steps.TrainState, steps.Setup], steps.TrainState]] | None = None,
  member_map: str | None = None,
) -> list[dict[str, Any]]:
  """Trains the members as one program in `pop_dir`, then writes each out to its member dir.

  The arguments are `loop.run`'s, one per member where they differ (configs, workdirs,
  `initialize`); `member_map` is one of `members.MEMBER_MAPS` (default:
  `members.default_member_map`). Returns each member's results (as its `results.json`).
  """
  started = time.time()
  check_vectorizable(member_configs)
  count = len(member_configs)
  config = member_configs[0]
  workdir_lib.ensure_writable(pop_dir, jax.process_index())
  for c, d in zip(member_configs, member_dirs, strict=True):
    workdir_lib.ensure_writable(d, jax.process_index())
    checkpoints.check_resume_config(c, d)
  dataset = data_lib.load_dataset(
    config.data,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    devices_per_process=jax.local_device_count(),
  )
  if not dataset.info.in_memory:
    raise UserError(
      f'--vectorize needs a dataset held in memory; {config.data.name} is streamed (drop '
      '--vectorize to train the points one after another)'
    )
  mesh = steps.make_mesh()
  member_map = member_map or members.default_member_map(mesh.devices.flat[0].platform)
  if member_map not in members.MEMBER_MAPS:
    raise UserError(
      f'--member_map must be one of {", ".join(members.MEMBER_MAPS)}, got {member_map!r}'
    )
  build = functools.partial(
    steps.build, info=dataset.info, num_epochs=num_epochs, learning_rate=learning_rate, mesh=mesh
  )
  setups = [build(c) for c in member_configs]
  setup = setups[0]
  # The native CPU convolutions have no batching rule: a vmapped population traces XLA's.
  train_setup = dataclasses.replace(setup, cpu_speedups=member_map != 'vmap')
  plan = setup.plan

  record = {
    'stage': stage,
    'stream': stream,
    'member_map': member_map,
    'members': [
      {'workdir': d, 'config': json.loads(c.to_json_best_effort())}
      for c, d in zip(member_configs, member_dirs, strict=True)
    ],
  }
  stored = distributed.agree_json(lambda: read_population(pop_dir))
  if stored is not None and not _may_resume(stored, record):
    raise UserError(
      f'{pop_dir!r} holds another population (its members, configs or stage differ); rerun the '
      'same command or use a new --workdir'
    )
  if distributed.is_leader():
    workdir_lib.write_json(pop_dir, POPULATION_FILE, record)

  stacked_sharding = setup.replicated
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((count, *x.shape), x.dtype, sharding=stacked_sharding),
    setup.abstract_state,
  )
  # Each member's streams exactly as `loop.run` draws them for a run alone.
  member_keys = [
    jax.random.split(jax.random.fold_in(jax.random.key(c.seed), stream), 3) for c in member_configs
  ]
  init_keys = [k[0] for k in member_keys]
  data_keys = members.stack([k[1] for k in member_keys], stacked_sharding)
  keys = members.stack([k[2] for k in member_keys], stacked_sharding)
  hyper = jax.device_put(members.member_hyper(setups), stacked_sharding)

  start_step = distributed.agree(lambda: checkpoints.latest_step(pop_dir))
  elapsed_before = loop.check_resume_plan(pop_dir, setup, resuming=start_step is not None)
  manager = checkpoints.make_manager(pop_dir, keep=config.keep_checkpoints)
  if start_step is not None:
    state = checkpoints.restore(manager, start_step, abstract, pop_dir)
    logging.info('Resumed the population in %s from step %d.', pop_dir, start_step)
  else:
    states = []
    for k, s in enumerate(setups):
      state_k = steps.create_state(s, init_keys[k])
      if initialize is not None:
        state_k = initialize[k](state_k, s)
      states.append(state_k)
    state = members.stack(states, stacked_sharding)
    del states
    start_step = 0

  trainer = members.PopulationDispatch(
    [train_setup, *setups[1:]],
    dataset,
    data_keys=data_keys,
    keys=keys,
    hyper=hyper,
    member_map=member_map,
  )
  evaluator = dispatch.Evaluator(setup, dataset)
  writers = [metrics_io.create_writer(d, just_logging=jax.process_index() > 0) for d in member_dirs]
  if start_step == 0:
    for c, w in zip(member_configs, writers, strict=True):
      w.write_hparams(
        {k: v for k, v in configs.flatten(c).items() if isinstance(v, (int, float, str, bool))}
      )
  report = metrics_io.create_progress(plan.total_steps, writers[0])
  logging.info(
    '%s: %d members as one program (%s), %d steps (%d per epoch), global batch %d on %d devices.',
    stage or 'train',
    count,
    member_map,
    plan.total_steps,
    plan.steps_per_epoch,
    config.batch_size,
    mesh.size,
  )

  def evaluate_members(state) -> list[dict[str, Any]]:
    return [evaluator(members.member(state, k), config.data.eval_split) for k in range(count)]

  eval_metrics: list[dict[str, Any]] = []
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  previous = None
  step = start_step
  cadences = (config.log_every_steps, plan.eval_every_steps, config.checkpoint_every_steps)
  labels = list(member_dirs)

  def save(step: int) -> None:
    _check_finite(*previous, labels)
    checkpoints.save(manager, pop_dir, step, state)
    loop.record_elapsed(pop_dir, elapsed_before + time.time() - started)

  preemption.check_stop()
  with preemption.StopRequests(start_step=step, sync_every=config.log_every_steps) as stop:
    while step < plan.total_steps:
      n = min(trainer.max_steps, loop.next_boundary(step, cadences, plan.total_steps) - step)
      state, metrics = trainer(state, step, n)
      if previous is not None:
        _check_finite(*previous, labels)
      previous = (step, n, metrics.pop('finite'), metrics['loss'])
      step += n
      pending.append((n, metrics))
      report(step)
      is_last = step == plan.total_steps
      if step % config.log_every_steps == 0 or is_last:
        for k, w in enumerate(writers):
          w.write_scalars(step, _member_means(pending, k))
        pending = []
      if step % plan.eval_every_steps == 0 or is_last:
        with report.timed('eval'):
          eval_metrics = evaluate_members(state)
        for w, m in zip(writers, eval_metrics, strict=True):
          w.write_scalars(step, {f'eval/{k}': v for k, v in m.items()})
      saved = is_last or step % config.checkpoint_every_steps == 0
      if saved:
        save(step)
      if not is_last and stop.should_stop(step):
        if not saved:
          save(step)
        checkpoints.finish(manager, pop_dir, step)
        for w in writers:
          w.close()
        raise Interrupted(
          f'stopped by {stop.signal_name} at step {step}; the population checkpoint is written '
          f'to {workdir_lib.path(pop_dir, workdir_lib.CHECKPOINT_DIR, str(step))}; run the same '
          'command again to resume',
          stop.exit_code,
        )
  if previous is not None:
    _check_finite(*previous, labels)
  checkpoints.finish(manager, pop_dir, step)
  if not eval_metrics:  # resumed a finished population: evaluate what is there
    eval_metrics = evaluate_members(state)
  for w in writers:
    w.flush()
    w.close()
  wall = elapsed_before + time.time() - started
  results = []
  for k, (c, d, s) in enumerate(zip(member_configs, member_dirs, setups, strict=True)):
    result = loop.results_of(c, s, stage, step, wall, eval_metrics[k], {})
    del result['time_split_s']
    result['population'] = {'members': count, 'member': k, 'workdir': pop_dir}
    if distributed.agree(lambda d=d: workdir_lib.is_finished(d)):
      result = workdir_lib.read_results(d)  # written before an interruption
    else:
      members.write_member(c, d, s, members.member(state, k), step, wall, result)
    results.append(result)
  return results


def _member_means(pending, k: int) -> dict[str, float]:
  """Member k's per-metric means over the steps since the last log."""
  chunks = jax.device_get(pending)
  return {
    f'train/{name}': float(np.mean(np.concatenate([m[name][:n, k] for n, m in chunks])))
    for name in chunks[0][1]
  }


def _check_finite(first_step: int, n: int, finite, loss, labels: Sequence[str]) -> None:
  flags = np.asarray(finite)[:n]
  if flags.all():
    return
  bad_step, bad_member = np.argwhere(~flags)[0]
  raise NonFiniteLossError(
    f'population member {labels[bad_member]}: non-finite loss or gradients at step '
    f'{first_step + int(bad_step) + 1}; training stopped, the last population checkpoint is kept'
  )
