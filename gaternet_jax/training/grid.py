"""A grid of runs as populations: one population per stage of the paper's procedure.

`train_grid` is what `gaternet train` does for each of several configs, every stage trained as
one population (training/population.py): stage 2 and 3 of a member start from that member's own
earlier stages (or from its own `init.*` runs), and members that differ only in gate-loss weights
share their plain pre-training stages. `train_stage` trains one stage's unfinished members; it
is also how `gaternet reproduce --vectorize` trains its controls. Each member directory is locked
while its population trains, as `gaternet train` locks its workdir.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Sequence

import jax
import ml_collections

from gaternet_jax import configs, models, validation
from gaternet_jax.errors import UserError
from gaternet_jax.training import (
  checkpoints,
  distributed,
  losses,
  members,
  preemption,
  procedure,
  restore,
)
from gaternet_jax.training import workdir as workdir_lib
from gaternet_jax.training.population import (
  POPULATION_DIR,
  check_sources,
  check_vectorizable,
  read_population,
  train_population,
)
from gaternet_jax.training.workdir import STAGE_BACKBONE, STAGE_GATER, STAGE_JOINT


def train_stage(stage_configs, stage_dirs, pop_dir: str, **kwargs) -> None:
  """`train_population` of the members whose run in `stage_dirs` is not finished yet; or, once a
  population exists in `pop_dir`, of its members (a kill while they were written out leaves some
  finished, and the population resumes as it was). `initialize` is one per member of the stage.

  A population whose members have all finished stays as it is: members added later (another
  seed) train in the next free `pop_dir.2`, `pop_dir.3`, ... A member directory holding a
  checkpoint of a run trained alone is refused rather than trained over from step 0.
  """
  finished = [distributed.agree(lambda d=d: workdir_lib.is_finished(d)) for d in stage_dirs]
  if all(finished):
    return
  base, number = pop_dir, 1
  while True:
    stored = distributed.agree_json(lambda: read_population(pop_dir))
    if stored is None or not distributed.agree(
      lambda: all(workdir_lib.is_finished(m['workdir']) for m in stored['members'])
    ):
      break
    number += 1
    pop_dir = f'{base}.{number}'
  ours = {m['workdir'] for m in stored['members']} if stored else set()
  todo = [i for i, d in enumerate(stage_dirs) if d in ours or not finished[i]]
  for i in todo:
    d = stage_dirs[i]
    step = None if d in ours else distributed.agree(lambda d=d: checkpoints.latest_step(d))
    if step is not None:
      raise UserError(
        f'{d!r} holds a checkpoint (step {step}) of a run trained alone; resume it without '
        '--vectorize, or use a new --workdir'
      )
  preemption.check_stop()
  init = kwargs.pop('initialize', None)
  train_population(
    [stage_configs[i] for i in todo],
    [stage_dirs[i] for i in todo],
    pop_dir,
    initialize=None if init is None else [init[i] for i in todo],
    **kwargs,
  )


@contextlib.contextmanager
def locked_members(member_dirs: Sequence[str]):
  """Every member directory locked as `gaternet train` locks its workdir, for as long as their
  populations train: a run started alone in one of them meanwhile is refused."""
  seen = set()
  for d in member_dirs:
    key = d if '://' in d else os.path.abspath(d)
    if key in seen:
      raise UserError(f'{d!r} is the directory of two members (a value repeated in the grid?)')
    seen.add(key)
  with contextlib.ExitStack() as stack:
    for d in member_dirs:
      workdir_lib.ensure_writable(d, jax.process_index())
      stack.enter_context(procedure.locked(d))
    yield


def train_grid(
  member_configs: Sequence[ml_collections.ConfigDict],
  member_dirs: Sequence[str],
  workdir: str,
  *,
  member_map: str | None = None,
) -> list[dict[str, Any]]:
  """What `gaternet train` does for each config, with every stage trained as one population.

  A gated config with `procedure.pretrain` runs the paper's three stages, each a population in
  `workdir/POPULATION_DIR/<stage>` whose members land in `<member dir>/<stage>`; then each member
  directory is finished by `procedure.run`, exactly as a run alone finishes. Members whose stage
  is already finished are not trained again.
  """
  # Finished members are not trained again: a run saved by an older version may keep other values.
  finished = [distributed.agree(lambda d=d: workdir_lib.is_finished(d)) for d in member_dirs]
  unfinished = [i for i, done in enumerate(finished) if not done]
  check_vectorizable([member_configs[i] for i in unfinished])
  check_sources(member_configs)
  validation.validate_workdir(workdir)
  for c, d in zip(member_configs, member_dirs, strict=True):
    validation.validate_config(c)
    validation.validate_workdir(d)
  config = member_configs[unfinished[0] if unfinished else 0]  # the stages' shared recipe
  pop_root = workdir_lib.join(workdir, POPULATION_DIR)
  workdir_lib.ensure_writable(workdir, jax.process_index())

  with procedure.locked(workdir), locked_members(member_dirs):
    if not (config.model.gated and config.procedure.pretrain):
      train_stage(
        member_configs, member_dirs, workdir_lib.join(pop_root, 'run'), member_map=member_map
      )
      return [workdir_lib.read_results(d) for d in member_dirs]

    for c, d in zip(member_configs, member_dirs, strict=True):
      procedure.check_init_sources(c)
      checkpoints.check_resume_config(c, d, workdir_lib.STAGES)
    pretrain_epochs = config.procedure.pretrain_epochs
    if pretrain_epochs is None:
      pretrain_epochs = config.schedule.num_epochs

    def pretrained(stage, stage_config, field) -> list[str]:
      if config.init[field]:  # set for every member (check_vectorizable), each its own
        return [restore.pretrained_dir(c.init[field], stage) for c in member_configs]
      dirs = [workdir_lib.join(d, stage) for d in member_dirs]
      stage_configs = [stage_config(c) for c in member_configs]
      # A pre-training stage is a plain network, which the gate-loss weights do not touch: the
      # members of a lambda x seed grid that share a seed share it. Each is trained once and
      # copied to the others (what they would have trained alone, bit for bit on the CPU).
      first: dict[str, int] = {}
      owner = [first.setdefault(_plain_run_key(c), i) for i, c in enumerate(stage_configs)]
      trained = sorted(set(owner))
      train_stage(
        [stage_configs[i] for i in trained],
        [dirs[i] for i in trained],
        workdir_lib.join(pop_root, stage),
        member_map=member_map,
        stage=stage,
        stream=procedure.STREAMS[stage],
        num_epochs=pretrain_epochs,
      )
      for i, o in enumerate(owner):
        if o != i and not distributed.agree(lambda i=i: workdir_lib.is_finished(dirs[i])):
          if distributed.is_leader():
            members.copy_finished_run(dirs[o], dirs[i], stage_configs[i])
          distributed.barrier(f'copy:{dirs[i]}')
      return dirs

    backbones = pretrained(STAGE_BACKBONE, procedure.backbone_stage_config, 'backbone')
    gaters = (
      [None] * len(member_dirs)
      if models.is_local(config)
      else pretrained(STAGE_GATER, procedure.gater_stage_config, 'gater')
    )
    p = config.procedure
    train_stage(
      member_configs,
      [workdir_lib.join(d, STAGE_JOINT) for d in member_dirs],
      workdir_lib.join(pop_root, STAGE_JOINT),
      member_map=member_map,
      stage=STAGE_JOINT,
      stream=procedure.STREAMS[STAGE_JOINT],
      num_epochs=config.schedule.num_epochs + p.joint_extra_epochs,
      learning_rate=p.joint_learning_rate,
      initialize=[
        functools.partial(_from_pretrained, backbone_dir=b, gater_dir=g)
        for b, g in zip(backbones, gaters, strict=True)
      ],
    )
  # Every stage is finished: the procedure only writes each member's top-level config and results.
  return [procedure.run(c, d) for c, d in zip(member_configs, member_dirs, strict=True)]


def _plain_run_key(config) -> str:
  """A plain run's config minus the gate-loss weights, which only a gated model reads."""
  ignored = set(losses.WEIGHT_FIELDS.values())
  flat = {k: v for k, v in configs.flatten(config).items() if k not in ignored}
  return json.dumps(flat, sort_keys=True, default=str)


def _from_pretrained(state, setup, *, backbone_dir, gater_dir):
  return procedure.init_from_pretrained(state, setup, backbone_dir, gater_dir)
