"""The paper's training procedure (section 4.4) and restoring finished runs.

A gated config trains in three stages, each a complete, resumable run in its own sub-directory:

  stage1_backbone/  the plain backbone on the target task (the original recipe);
  stage2_gater/     the gater's feature extractor trained as a classifier with its own head;
  stage3_joint/     the GaterNet, backbone from stage 1, extractor from stage 2 (its head dropped),
                    the gater's FC layers fresh, trained jointly.

A stage whose `results.json` exists is finished and never rerun; an interrupted stage resumes from
its latest checkpoint. `init.backbone` / `init.gater` name existing runs that replace stages 1 / 2.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections

from gaternet_jax import checkpoints, train
from gaternet_jax import data as data_lib
from gaternet_jax.errors import CheckpointError, UserError

STAGE_BACKBONE = 'stage1_backbone'
STAGE_GATER = 'stage2_gater'
STAGE_JOINT = 'stage3_joint'
STAGES = (STAGE_BACKBONE, STAGE_GATER, STAGE_JOINT)


def backbone_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The plain backbone of a gated config."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.variant = 'plain'
  c.model.gated = False
  return c


def gater_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The gater's feature extractor as a classifier (its own head) on the same task."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.variant = 'plain'
  c.model.backbone = config.gater.extractor
  c.model.width = config.gater.extractor_width
  c.model.se_reduction = 0
  c.model.gated = False
  return c


def is_finished(workdir: str) -> bool:
  return checkpoints.exists(workdir, checkpoints.RESULTS_FILE)


def run_dir(workdir: str) -> str:
  """The run a workdir stands for: itself, or the joint stage of a procedure workdir."""
  if checkpoints.exists(workdir, checkpoints.CHECKPOINT_DIR):
    return workdir
  joint = os.path.join(workdir, STAGE_JOINT)
  if checkpoints.exists(joint):
    return joint
  return workdir


def pretrained_dir(path: str, stage: str) -> str:
  """A run given by `init.*`: a plain run's workdir, or a procedure workdir holding `stage`."""
  if checkpoints.exists(path, stage):
    return os.path.join(path, stage)
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the three stages in `workdir`; returns the joint stage's results."""
  started = time.time()
  checkpoints.ensure_writable(workdir)
  checkpoints.check_resume_config(config, workdir, STAGES)
  checkpoints.save_config(config, workdir)
  pretrain_epochs = config.procedure.pretrain_epochs
  if pretrain_epochs is None:
    pretrain_epochs = config.schedule.num_epochs

  def pretrain(stage: str, stage_config, init_path: str | None) -> str:
    if init_path:
      source = pretrained_dir(init_path, stage)
      if not is_finished(source) and checkpoints.latest_step(source) is None:
        raise CheckpointError(f'init.{stage.split("_")[1]} = {init_path!r} holds no checkpoint')
      return source
    stage_dir = os.path.join(workdir, stage)
    if not is_finished(stage_dir):
      train.train_single(stage_config, stage_dir, stage=stage, num_epochs=pretrain_epochs)
    return stage_dir

  backbone_dir = pretrain(STAGE_BACKBONE, backbone_stage_config(config), config.init.backbone)
  gater_config = gater_stage_config(config)
  # A distinct seed: when the gater's extractor has the backbone's architecture, the two
  # pre-trained networks would otherwise be identical.
  gater_config.seed = config.seed + 1
  gater_dir = pretrain(STAGE_GATER, gater_config, config.init.gater)
  joint_dir = os.path.join(workdir, STAGE_JOINT)
  if is_finished(joint_dir):
    results = stored_results(joint_dir)
  else:
    p = config.procedure
    results = train.train_single(
      config,
      joint_dir,
      stage=STAGE_JOINT,
      num_epochs=config.schedule.num_epochs + p.joint_extra_epochs,
      learning_rate=p.joint_learning_rate,
      initialize=lambda state, setup: init_from_pretrained(state, setup, backbone_dir, gater_dir),
    )
  # wall_time_s stays the joint stage's; this is the whole command's (stages run by it).
  results = dict(
    results,
    stages={STAGE_BACKBONE: backbone_dir, STAGE_GATER: gater_dir, STAGE_JOINT: joint_dir},
    procedure_wall_time_s=round(time.time() - started, 2),
  )
  train.write_results(workdir, results)
  return results


def stored_results(workdir: str) -> dict[str, Any]:
  return checkpoints.read_json(workdir, checkpoints.RESULTS_FILE)


def load_state(workdir: str, *, info=None, mesh=None):
  """Restores the latest checkpoint of a run with the config stored beside it.

  Returns:
    (config, setup, state, dataset-or-None); the dataset is loaded when `info` is not given.
  """
  workdir = run_dir(workdir)
  config = checkpoints.load_config(workdir)
  step = checkpoints.latest_step(workdir)
  if step is None:
    raise CheckpointError(f'no checkpoint in {workdir!r}: train there first')
  dataset = None
  if info is None:
    dataset = data_lib.load_dataset(
      config.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    info = dataset.info
  setup = train.build(config, info, mesh=mesh)
  manager = checkpoints.make_manager(workdir, keep=config.keep_checkpoints, create=False)
  try:
    state = checkpoints.restore(manager, step, setup.abstract_state, workdir)
  finally:
    manager.close()
  return config, setup, state, dataset


def init_from_pretrained(
  state: train.TrainState, setup: train.Setup, backbone_dir: str, gater_dir: str
) -> train.TrainState:
  """Stage 3's starting point: stage 1's backbone, stage 2's extractor, fresh gater FC layers.

  Parameters and batch statistics are copied exactly; the optimizer state starts fresh.
  Architecture mismatches raise CheckpointError naming the parameter.
  """
  params = jax.tree.map(lambda x: x, state.params)  # shallow copies we may edit
  stats = jax.tree.map(lambda x: x, state.batch_stats)
  params, stats = dict(params), dict(stats)
  _, _, backbone_state, _ = load_state(backbone_dir, info=setup.info, mesh=setup.mesh)
  _, _, gater_state, _ = load_state(gater_dir, info=setup.info, mesh=setup.mesh)

  checkpoints.check_compatible(
    backbone_state.params['backbone'], params['backbone'], backbone_dir, prefix='backbone/'
  )
  params['backbone'] = backbone_state.params['backbone']
  stats['backbone'] = backbone_state.batch_stats['backbone']

  extractor_params = {k: v for k, v in gater_state.params['backbone'].items() if k != 'head'}
  gater_params, gater_stats = dict(params['gater']), dict(stats['gater'])
  checkpoints.check_compatible(
    extractor_params, gater_params['extractor'], gater_dir, prefix='gater/extractor/'
  )
  gater_params['extractor'] = extractor_params
  gater_stats['extractor'] = gater_state.batch_stats['backbone']
  params['gater'], stats['gater'] = gater_params, gater_stats

  shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
  fresh = train.TrainState(
    step=state.step, params=params, batch_stats=stats, opt_state=setup.tx.init(params)
  )
  return jax.device_put(fresh, shardings)


def require_checkpoint(workdir: str) -> str:
  """The run directory of `workdir`, or a UserError if it holds no run."""
  directory = run_dir(workdir)
  path = checkpoints.workdir_path(workdir)
  if not path.exists():
    raise UserError(f'workdir {workdir!r} does not exist')
  if not path.is_dir():
    raise UserError(f'workdir {workdir!r} is a file, not a run directory')
  if checkpoints.latest_step(directory) is None:
    raise CheckpointError(f'no checkpoint in {workdir!r}: train there first')
  return directory
