"""The paper's training procedure (section 4.4), and `train_and_evaluate`, the entry point.

A gated config trains in three stages, each a complete, resumable run in its own sub-directory:

  stage1_backbone/  the plain backbone on the target task (the original recipe);
  stage2_gater/     the gater's feature extractor trained as a classifier with its own head;
  stage3_joint/     the GaterNet, backbone from stage 1, extractor from stage 2 (its head dropped),
                    the gater's FC layers fresh, trained jointly.

A locally gated config (`gating.method=local`, Batch-Shaping's gating modules) has no gater: it
skips stage 2, and its joint stage starts from stage 1's backbone with fresh gating modules.

A stage whose `results.json` exists is finished and never rerun; an interrupted stage resumes from
its latest checkpoint. `init.backbone` / `init.gater` name existing runs that replace stages 1 / 2.
Anything else (a plain config, or a gated one with `procedure.pretrain=False`) is one run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import ml_collections

from gaternet_jax import models, validation
from gaternet_jax.errors import CheckpointError, UserError
from gaternet_jax.gating.local import MODULE_NAME as LOCAL_GATE_MODULE
from gaternet_jax.training import (
  checkpoints,
  distributed,
  loop,
  preemption,
  restore,
  steps,
  workdir_lock,
)
from gaternet_jax.training import workdir as workdir_lib
from gaternet_jax.training.workdir import STAGE_BACKBONE, STAGE_GATER, STAGE_JOINT, STAGES


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, resume_step: int | None = None
) -> dict[str, Any]:
  """Trains what `config` describes in `workdir` and returns the final eval metrics.

  A gated config with `procedure.pretrain` runs the paper's three stages; anything else is one
  run (`loop.run`). The config is validated before anything is written, and the workdir is
  locked for the whole run (by process 0), so a second run on it is refused with one line.
  `resume_step` resumes the run (the first unfinished stage of a procedure) from that checkpoint
  instead of the latest; the later ones are set aside, not deleted.
  """
  validation.validate_workdir(workdir)
  validation.validate_config(config)
  config = checkpoints.keep_stored_recipe(config, workdir, STAGES)
  if config.model.gated and config.procedure.pretrain:
    check_init_sources(config)
  workdir_lib.ensure_writable(workdir, jax.process_index())
  with locked(workdir):
    if config.model.gated and config.procedure.pretrain:
      return run(config, workdir, resume_step=resume_step)
    return loop.run(config, workdir, resume_step=resume_step)


def train_control(
  config: ml_collections.ConfigDict, workdir: str, backbone_dir: str
) -> dict[str, Any]:
  """The control the paper lacks: a plain backbone with a gated run's training.

  `config` is plain; the run starts from `backbone_dir`'s parameters and batch statistics (the
  plain run a gated run took as its stage 1) and trains for the joint stage's epochs and learning
  rate, with a fresh optimizer, a restarted schedule and the joint stage's random stream: stage 1
  + stage 3 arranged as the procedure arranges them, without the gater. Resumable like any run.
  """
  validation.validate_workdir(workdir)
  validation.validate_config(config)
  if config.model.gated:
    raise UserError('the control trains a plain backbone; got a gated config')
  config = checkpoints.keep_stored_recipe(config, workdir)
  workdir_lib.ensure_writable(workdir, jax.process_index())
  with locked(workdir):
    return loop.run(config, workdir, **control_stage(config, backbone_dir))


def control_stage(config: ml_collections.ConfigDict, backbone_dir: str) -> dict[str, Any]:
  """The control's arguments to `loop.run` (and, per member, to a population's training): the
  joint stage's random stream, epochs and learning rate, from `backbone_dir`'s plain run."""
  p = config.procedure
  return dict(
    stage='control',
    stream=STREAMS[STAGE_JOINT],
    num_epochs=config.schedule.num_epochs + p.joint_extra_epochs,
    learning_rate=p.joint_learning_rate,
    initialize=lambda state, setup: init_from_pretrained(state, setup, backbone_dir, None),
  )


@contextlib.contextmanager
def locked(workdir: str):
  """Holds the workdir's lock on process 0; every process raises alike when it is taken."""
  lock = workdir_lock.WorkdirLock(workdir_lib.path(workdir)) if distributed.is_leader() else None
  refusal = None
  if lock is not None:
    try:
      lock.acquire()
    except UserError as e:
      refusal = str(e)
  if distributed.agree(lambda: refusal is not None):
    raise UserError(refusal or f'workdir {workdir!r} is in use by another gaternet run')
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def backbone_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The plain backbone of a gated config."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.gated = False
  return c


def gater_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The gater's feature extractor as a classifier (its own head) on the same task."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.backbone = config.gater.extractor
  c.model.width = config.gater.extractor_width
  c.model.se_reduction = 0
  c.model.gated = False
  return c


# Each stage draws its own random stream of the config's seed (`loop.run`'s `stream`): the two
# pre-trained networks differ even when the gater's extractor has the backbone's architecture,
# the joint stage does not replay stage 1's data order, and no stage of seed s equals a stage of
# seed s + 1.
STREAMS = {STAGE_BACKBONE: 1, STAGE_GATER: 2, STAGE_JOINT: 3}


# The data fields that decide which examples a run trained on: a pre-trained stage taken from a
# run that differs in any of them may have seen this run's held-out (or test) examples.
TRAINING_DATA_FIELDS = ('name', 'holdout', 'holdout_seed', 'image_size')


def check_init_sources(config: ml_collections.ConfigDict) -> None:
  """Refuses `init.backbone` / `init.gater` runs trained on other data (one line, nothing written).

  Raises:
    CheckpointError: the run has no checkpoint or stored config.
    UserError: it was trained on another dataset, hold-out size or hold-out seed.
  """
  for field, stage in (('backbone', STAGE_BACKBONE), ('gater', STAGE_GATER)):
    path = config.init[field]
    if not path:
      continue
    source = restore.pretrained_dir(path, stage)
    if not distributed.agree(
      lambda: workdir_lib.is_finished(source) or checkpoints.latest_step(source) is not None
    ):
      raise CheckpointError(f'init.{field} = {path!r} holds no checkpoint')
    stored = workdir_lib.load_config(source).data
    # In-memory datasets keep their own image size; only a streamed one is resized.
    fields = [k for k in TRAINING_DATA_FIELDS if k != 'image_size' or not _in_memory(config)]
    differ = [
      f'data.{k} (there {stored.get(k)!r}, here {config.data[k]!r})'
      for k in fields
      if stored.get(k) != config.data[k]
    ]
    if differ:
      raise UserError(
        f'init.{field} = {path!r} was trained on other data: {", ".join(differ)}; its '
        "examples may include this run's held-out ones, so it cannot initialise this run"
      )
    there, here = (
      models.strided_padding_of(workdir_lib.load_config(source)),
      models.strided_padding_of(config),
    )
    if there != here:
      raise UserError(
        f'init.{field} = {path!r} was trained with model.strided_padding={there!r}, this run has '
        f'{here!r}: its filters would see shifted pixels; add '
        f'--config.model.strided_padding={there} or pre-train anew'
      )


def _in_memory(config) -> bool:
  return config.data.name != 'imagenet2012'


def run(
  config: ml_collections.ConfigDict, workdir: str, *, resume_step: int | None = None
) -> dict[str, Any]:
  """Runs the three stages in `workdir`; returns the joint stage's results."""
  pending_resume = [resume_step]  # for the first stage this command trains

  def take_resume_step():
    step, pending_resume[0] = pending_resume[0], None
    return step

  workdir_lib.ensure_writable(workdir, jax.process_index())
  checkpoints.check_resume_config(config, workdir, STAGES)
  if distributed.agree(lambda: workdir_lib.is_finished(workdir)):
    return workdir_lib.read_results(workdir)  # finished: a rerun changes nothing
  if distributed.is_leader():
    workdir_lib.save_config(config, workdir)
  pretrain_epochs = config.procedure.pretrain_epochs
  if pretrain_epochs is None:
    pretrain_epochs = config.schedule.num_epochs

  def pretrain(stage: str, stage_config, init_path: str | None) -> str:
    if init_path:  # checked by check_init_sources
      return restore.pretrained_dir(init_path, stage)
    stage_dir = workdir_lib.join(workdir, stage)
    preemption.check_stop()
    if not distributed.agree(lambda: workdir_lib.is_finished(stage_dir)):
      loop.run(
        stage_config,
        stage_dir,
        stage=stage,
        stream=STREAMS[stage],
        num_epochs=pretrain_epochs,
        resume_step=take_resume_step(),
      )
    return stage_dir

  backbone_dir = pretrain(STAGE_BACKBONE, backbone_stage_config(config), config.init.backbone)
  local = models.is_local(config)
  gater_dir = (
    None if local else pretrain(STAGE_GATER, gater_stage_config(config), config.init.gater)
  )
  joint_dir = workdir_lib.join(workdir, STAGE_JOINT)
  preemption.check_stop()
  if distributed.agree(lambda: workdir_lib.is_finished(joint_dir)):
    results = workdir_lib.read_results(joint_dir)
  else:
    p = config.procedure
    results = loop.run(
      config,
      joint_dir,
      stage=STAGE_JOINT,
      stream=STREAMS[STAGE_JOINT],
      num_epochs=config.schedule.num_epochs + p.joint_extra_epochs,
      learning_rate=p.joint_learning_rate,
      initialize=lambda state, setup: init_from_pretrained(state, setup, backbone_dir, gater_dir),
      resume_step=take_resume_step(),
    )
  # wall_time_s stays the joint stage's; the procedure's is every stage trained in this
  # workdir, each counted over all of its resumed pieces.
  stages = {STAGE_BACKBONE: backbone_dir, STAGE_GATER: gater_dir, STAGE_JOINT: joint_dir}
  stages = {s: d for s, d in stages.items() if d is not None}
  own = [d for s, d in stages.items() if d == workdir_lib.join(workdir, s)]
  wall = sum(workdir_lib.read_results(d)['wall_time_s'] for d in own if d != joint_dir)
  results = dict(
    results,
    stages=stages,
    procedure_wall_time_s=round(wall + results['wall_time_s'], 2),
  )
  loop.write_results(workdir, results)
  return results


def _without_local_gates(tree: Any) -> Any:
  """A variables subtree minus every local gating module (`<unit>/gate`)."""
  if not isinstance(tree, dict):
    return tree
  return {k: _without_local_gates(v) for k, v in tree.items() if k != LOCAL_GATE_MODULE}


def _overlay(fresh: Any, pretrained: Any) -> Any:
  """`fresh` with every entry `pretrained` has replaced by the pretrained one."""
  if not isinstance(fresh, dict):
    return pretrained
  return {k: _overlay(v, pretrained[k]) if k in pretrained else v for k, v in fresh.items()}


def init_from_pretrained(
  state: steps.TrainState, setup: steps.Setup, backbone_dir: str, gater_dir: str | None
) -> steps.TrainState:
  """Stage 3's starting point: stage 1's backbone, stage 2's extractor, fresh gater FC layers
  (a locally gated model, `gater_dir` None: stage 1's backbone with fresh gating modules).

  Parameters and batch statistics are copied exactly; the optimizer state starts fresh.
  Architecture mismatches raise CheckpointError naming the parameter.
  """
  params, stats = dict(state.params), dict(state.batch_stats)  # shallow copies we may edit
  backbone_state = restore.load_state(backbone_dir, info=setup.info, mesh=setup.mesh).state

  checkpoints.check_compatible(
    backbone_state.params['backbone'],
    _without_local_gates(params['backbone']),
    backbone_dir,
    prefix='backbone/',
  )
  params['backbone'] = _overlay(params['backbone'], backbone_state.params['backbone'])
  stats['backbone'] = _overlay(stats['backbone'], backbone_state.batch_stats['backbone'])
  if gater_dir is None:
    return _fresh_optimizer(state, setup, params, stats)
  gater_state = restore.load_state(gater_dir, info=setup.info, mesh=setup.mesh).state

  extractor_params = {k: v for k, v in gater_state.params['backbone'].items() if k != 'head'}
  gater_params, gater_stats = dict(params['gater']), dict(stats['gater'])
  checkpoints.check_compatible(
    extractor_params, gater_params['extractor'], gater_dir, prefix='gater/extractor/'
  )
  gater_params['extractor'] = extractor_params
  gater_stats['extractor'] = gater_state.batch_stats['backbone']
  params['gater'], stats['gater'] = gater_params, gater_stats
  return _fresh_optimizer(state, setup, params, stats)


def _fresh_optimizer(state, setup, params, stats) -> steps.TrainState:
  """The state with these variables and a fresh optimizer state, in its shardings."""
  shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
  fresh = steps.TrainState(
    step=state.step, params=params, batch_stats=stats, opt_state=setup.tx.init(params)
  )
  return jax.device_put(fresh, shardings)
