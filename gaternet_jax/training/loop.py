"""One run's loop: resume or initialise, train with periodic evaluation and checkpoints, results.

`run(config, workdir)` trains one model (a plain network, one stage of the paper's procedure, or a
GaterNet trained from scratch) in one run directory. The steps it calls are pure (`steps.py`); the
paper's stages are composed on top of it in `procedure.py`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from gaternet_jax import configs, models
from gaternet_jax import data as data_lib
from gaternet_jax.errors import CheckpointError, Interrupted, NonFiniteLossError, UserError
from gaternet_jax.training import checkpoints, dispatch, distributed, metrics_io, preemption, steps
from gaternet_jax.training import workdir as workdir_lib

# Random streams per seed: 0 for a single run, one per stage of the procedure (`procedure.py`).
STREAMS_PER_SEED = 16


def check_resume_plan(workdir: str, setup: steps.Setup, *, resuming: bool) -> float:
  """Stores the derived plan (process 0); on resume, refuses a dataset of another size.

  Returns the training time already spent in the workdir by earlier, interrupted pieces (up to
  their last checkpoint), so that `wall_time_s` counts the whole run.

  The config can match while the data do not (e.g. `data.data_dir` pointed at another copy):
  a different number of training examples would silently change steps per epoch, the total
  steps and the schedule. A different device count only changes the data order, so it is
  logged.
  """
  plan = plan_record(setup)
  stored = None
  if resuming and workdir_lib.exists(workdir, workdir_lib.PLAN_FILE):
    stored = workdir_lib.read_json(workdir, workdir_lib.PLAN_FILE)
  if stored is not None:
    if stored.get('num_train') != plan['num_train']:
      raise UserError(
        f'workdir {workdir!r} was trained on {stored.get("num_train")} training examples, '
        f'the data now has {plan["num_train"]}; resume with the same data or use a new --workdir'
      )
    if stored.get('devices') != plan['devices']:
      logging.warning(
        'Resuming on %d devices, trained on %d: the order of training examples changes.',
        plan['devices'],
        stored.get('devices'),
      )
  plan['elapsed_s'] = float(stored.get('elapsed_s', 0.0)) if stored else 0.0
  if distributed.is_leader():
    workdir_lib.write_json(workdir, workdir_lib.PLAN_FILE, plan)
  return plan['elapsed_s']


def plan_record(setup: steps.Setup) -> dict[str, int]:
  """What `plan.json` holds of a run's derived plan (besides the training time spent)."""
  return {
    'num_train': setup.info.num_train,
    'steps_per_epoch': setup.plan.steps_per_epoch,
    'total_steps': setup.plan.total_steps,
    'devices': setup.mesh.size,
  }


def record_elapsed(workdir: str, elapsed: float) -> None:
  """Training time up to the checkpoint just saved, kept in plan.json for a later resume."""
  if distributed.is_leader():
    plan = workdir_lib.read_json(workdir, workdir_lib.PLAN_FILE)
    workdir_lib.write_json(workdir, workdir_lib.PLAN_FILE, dict(plan, elapsed_s=round(elapsed, 2)))


def _start_step(workdir: str, resume_step: int | None) -> int | None:
  """The checkpoint to resume from: the latest, or `resume_step` when given (it must exist)."""
  if resume_step is None:
    return distributed.agree(lambda: checkpoints.latest_step(workdir))
  if not distributed.agree(lambda: resume_step in checkpoints.steps(workdir)):
    raise CheckpointError(
      f'--resume_step={resume_step}: no such checkpoint in {workdir!r}; it has '
      f'{checkpoints.steps(workdir)}'
    )
  checkpoints.set_aside_after(workdir, resume_step)
  distributed.barrier(f'set_aside:{workdir}')
  return resume_step


def write_results(workdir: str, results: dict[str, Any]) -> None:
  if distributed.is_leader():
    workdir_lib.write_json(workdir, workdir_lib.RESULTS_FILE, results)


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stage: str | None = None,
  stream: int = 0,
  num_epochs: float | None = None,
  learning_rate: float | None = None,
  initialize: Callable[[steps.TrainState, steps.Setup], steps.TrainState] | None = None,
  resume_step: int | None = None,
) -> dict[str, Any]:
  """One run: resume or initialise, train with periodic eval and checkpoints, write results.

  Args:
    config: the run's config (stored as `workdir/config.json`; a resume must match it).
    workdir: where checkpoints, events and results go.
    stage: a label for logs and results (procedure stages).
    stream: which random stream of `config.seed` this run draws from (initialisation, data
      order, augmentation, SemHash noise): every stage of the procedure has its own, so no two
      runs of one seed, nor stage k of seed s and stage j of seed s', share randomness.
    num_epochs, learning_rate: override the recipe's (procedure stages).
    initialize: applied to a freshly initialised state (never to a resumed one), e.g. to load
      pre-trained parameters.
    resume_step: resume from this checkpoint instead of the latest (e.g. when the latest is
      corrupt); later checkpoints are left on disk and replaced as training passes them.

  Returns:
    The results written to `workdir/results.json` (final evaluation, step, wall time, ...).
  """
  started = time.time()
  workdir_lib.ensure_writable(workdir, jax.process_index())
  checkpoints.check_resume_config(config, workdir)
  dataset = data_lib.load_dataset(
    config.data,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    devices_per_process=jax.local_device_count(),
  )
  setup = steps.build(config, dataset.info, num_epochs=num_epochs, learning_rate=learning_rate)
  plan = setup.plan
  start_step = _start_step(workdir, resume_step)
  elapsed_before = check_resume_plan(workdir, setup, resuming=start_step is not None)
  if start_step == plan.total_steps and distributed.agree(
    lambda: (
      workdir_lib.is_finished(workdir) and workdir_lib.exists(workdir, workdir_lib.CONFIG_FILE)
    )
  ):
    # A finished run whose stored config matched: nothing to train, and its results (wall time
    # included) stay as they are. Without a stored config the checkpoint is restored below,
    # which checks that it fits the model.
    logging.info('%s is finished (step %d); its results are unchanged.', workdir, start_step)
    return workdir_lib.read_results(workdir)
  # One root key per (seed, stream); initialisation, data order and the per-step randomness
  # (augmentation, SemHash, gate dropout) each get their own part, made inside jit so that they
  # are global replicated arrays on every host.
  init_key, data_key, key = jax.jit(
    lambda: tuple(jax.random.split(jax.random.fold_in(jax.random.key(config.seed), stream), 3)),
    out_shardings=(setup.replicated,) * 3,
  )()
  manager = checkpoints.make_manager(workdir, keep=config.keep_checkpoints)
  if start_step is not None:
    state = checkpoints.restore(manager, start_step, setup.abstract_state, workdir)
    logging.info('Resumed %s from step %d.', workdir, start_step)
  else:
    state = steps.create_state(setup, init_key)
    if initialize is not None:
      state = initialize(state, setup)
    start_step = 0
  # Stored only now that the checkpoint (if any) proved compatible: a refused resume must not
  # leave its config behind.
  if distributed.is_leader():
    workdir_lib.save_config(config, workdir)
  trainer = dispatch.TrainDispatch(
    setup,
    dataset,
    start_step=start_step,
    seed=config.seed * STREAMS_PER_SEED + stream,  # tf.data's seed for streamed datasets
    data_key=data_key,
    key=key,
  )
  evaluator = dispatch.Evaluator(setup, dataset)

  writer = metrics_io.create_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(
      {k: v for k, v in configs.flatten(config).items() if isinstance(v, (int, float, str, bool))}
    )
  report = metrics_io.create_progress(plan.total_steps, writer)
  logging.info(
    '%s: %d steps (%d per epoch), global batch %d on %d devices.',
    stage or 'train',
    plan.total_steps,
    plan.steps_per_epoch,
    config.batch_size,
    setup.mesh.size,
  )

  eval_metrics: dict[str, Any] = {}
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # (steps, metrics) of unlogged chunks
  previous = None  # (first step, steps, finite flags, losses) of the last chunk, checked late
  step = start_step
  cadences = (config.log_every_steps, plan.eval_every_steps, config.checkpoint_every_steps)

  min_interval = checkpoints.min_interval_s(config, steps.platform(setup))
  last_saved = time.monotonic()
  # Where this piece of the run's wall time went (results.json `time_split_s`; of a resumed run,
  # the last piece): setup (data, model, state), the first dispatch (its tracing and
  # compilation), evaluation, checkpoints (a save first waits for the steps in flight), and
  # training: the rest.
  time_split = {
    'setup': time.time() - started,
    'first_dispatch': 0.0,
    'eval': 0.0,
    'checkpoint': 0.0,
  }

  def save(step: int) -> None:
    nonlocal last_saved
    saving = time.time()
    _check_finite(*previous)  # never write a checkpoint of a diverged state
    checkpoints.save(manager, workdir, step, state)
    record_elapsed(workdir, elapsed_before + time.time() - started)
    last_saved = time.monotonic()
    time_split['checkpoint'] += time.time() - saving

  def checkpoint_due(step: int) -> bool:
    if step % config.checkpoint_every_steps:
      return False
    # A save is collective: process 0's clock decides for every host.
    return min_interval <= 0 or distributed.agree(
      lambda: time.monotonic() - last_saved >= min_interval
    )

  preemption.check_stop()  # a signal during setup and compilation stops before training
  with preemption.StopRequests(start_step=step, sync_every=config.log_every_steps) as stop:
    while step < plan.total_steps:
      # A chunk never crosses a log, eval or checkpoint step, so each happens where the config
      # puts it, whatever the steps per dispatch.
      n = min(trainer.max_steps, next_boundary(step, cadences, plan.total_steps) - step)
      dispatching = time.time()
      state, metrics = trainer(state, step, n)
      if step == start_step:
        time_split['first_dispatch'] = time.time() - dispatching
      if previous is not None:
        _check_finite(*previous)  # the previous chunk's flags: read without stalling the device
      previous = (step, n, metrics.pop('finite'), metrics['loss'])
      step += n
      pending.append((n, metrics))
      report(step)
      if step % config.log_every_steps == 0 or step == plan.total_steps:
        writer.write_scalars(step, _mean_metrics(pending))
        pending = []
      is_last = step == plan.total_steps
      if step % plan.eval_every_steps == 0 or is_last:
        evaluating = time.time()
        with report.timed('eval'):
          eval_metrics = evaluator(state, config.data.eval_split)
        time_split['eval'] += time.time() - evaluating
        writer.write_scalars(step, {f'eval/{k}': v for k, v in eval_metrics.items()})
      saved = is_last or checkpoint_due(step)
      if saved:
        save(step)
      # Asked at every boundary but the last, checkpoint step or not: a run that checkpoints at
      # every boundary (e.g. checkpoint_every_steps = steps_per_dispatch) must still stop.
      if not is_last and stop.should_stop(step):
        if not saved:
          save(step)
        checkpoints.finish(manager, workdir, step)
        writer.close()
        raise Interrupted(
          f'stopped by {stop.signal_name} at step {step}; checkpoint written to '
          f'{workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR, str(step))}; run the same '
          'command again to resume',
          stop.exit_code,
        )
  if previous is not None:
    _check_finite(*previous)
  checkpoints.finish(manager, workdir, step)
  if not eval_metrics:  # resumed a finished run: nothing trained, evaluate what is there
    eval_metrics = evaluator(state, config.data.eval_split)
  writer.flush()
  writer.close()
  time_split['train'] = time.time() - started - sum(time_split.values())
  results = results_of(
    config, setup, stage, step, elapsed_before + time.time() - started, eval_metrics, time_split
  )
  write_results(workdir, results)
  return results


def results_of(
  config: ml_collections.ConfigDict,
  setup: steps.Setup,
  stage: str | None,
  step: int,
  wall_time_s: float,
  eval_metrics: dict[str, Any],
  time_split: dict[str, float],
) -> dict[str, Any]:
  """What a finished run's `results.json` holds."""
  layout = models.gate_layout(config, setup.info.image_shape) if config.model.gated else []
  return {
    'name': config.name,
    'variant': configs.variant_of(config),
    'dataset': config.data.name,
    'backbone': config.model.backbone,
    'params': int(sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))),
    'gated_filters': sum(layer.filters for layer in layout),
    'stage': stage,
    'step': int(step),
    'total_steps': setup.plan.total_steps,
    'wall_time_s': round(wall_time_s, 2),
    'split': config.data.eval_split,
    'eval': eval_metrics,
    'time_split_s': {k: round(v, 2) for k, v in time_split.items()},
  }


def next_boundary(step: int, cadences: tuple[int, ...], total_steps: int) -> int:
  """The first step after `step` at which the loop logs, evaluates, checkpoints or ends."""
  return min(total_steps, *((step // c + 1) * c for c in cadences))


def _mean_metrics(pending: list[tuple[int, dict[str, jax.Array]]]) -> dict[str, float]:
  """Per-metric means over every step of the chunks since the last log."""
  chunks = jax.device_get(pending)
  return {
    f'train/{k}': float(np.mean(np.concatenate([m[k][:n] for n, m in chunks])))
    for k in chunks[0][1]
  }


def _check_finite(first_step: int, n: int, finite: jax.Array, loss: jax.Array) -> None:
  """Raises at the first step of a chunk whose loss or update was not finite."""
  bad = dispatch.first_non_finite(finite, n)
  if bad is None:
    return
  value = float(np.asarray(loss)[bad])
  what = f'non-finite loss ({value})' if not math.isfinite(value) else 'non-finite gradients'
  raise NonFiniteLossError(
    f'{what} at step {first_step + bad + 1}; training stopped, the last checkpoint before it is '
    'kept'
  )
