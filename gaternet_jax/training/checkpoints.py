"""Orbax checkpoints: the manager, integrity, compatibility checks and resume checks.

Checkpoints live in `WORKDIR/checkpoints/<step>/`, written atomically by Orbax (a step directory
appears only once complete, so a run killed mid-save leaves the previous checkpoints intact). Beside
them `checksums.json` holds a digest of every checkpoint's arrays, written before the checkpoint
itself and verified on every restore, so a flipped bit is an error naming the step instead of a
silently altered model.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gaternet_jax import configs, legacy
from gaternet_jax.errors import CheckpointError, UserError
from gaternet_jax.training import distributed
from gaternet_jax.training import workdir as workdir_lib

# Fields a resumed run may change without conflicting with the stored config: they affect
# logging, cadence and where data is read from, not what is trained.
RESUMABLE_FIELDS = frozenset(
  {
    'log_every_steps',
    'steps_per_dispatch',
    'eval_every_epochs',
    'checkpoint_every_steps',
    'checkpoint_min_interval_s',
    'keep_checkpoints',
    'data.data_dir',
    'eval_batch_size',
    'init.backbone',
    'init.gater',
  }
)
# Sections only a run with gates reads (the gater and the gate losses). A plain, unpruned run
# trains the same whatever they hold (tests/test_reproduce.py checks it bit for bit), so they do
# not make its stored config another one: `gaternet reproduce` keeps its finished plain runs when
# the gated runs' λ is chosen after them.
GATE_SECTIONS = ('gater.', 'gating.')


def trains_without_gates(flat: dict[str, Any]) -> bool:
  """Whether a flattened config describes a plain run: no gates and no pruning plan (an export's
  plan may keep local gates, which read `gating.*`)."""
  pruning = any(
    v for k, v in flat.items() if k == 'model.pruning' or k.startswith('model.pruning.')
  )
  return not flat.get('model.gated') and not pruning


# Periodic checkpoints are at least this many seconds apart on a GPU or TPU when
# `config.checkpoint_min_interval_s` is None. There a CIFAR ResNet-20 step takes 2-5 ms, so
# 1,000 steps pass in seconds, and on one H100 the synchronous save every 1,000 steps (0.55 s
# plain, 0.95 s gated, 57 saves) was 14-17% of the 164-epoch runs' wall time. On the CPU 1,000
# steps take minutes: no floor. A hard kill loses at most this long (or `checkpoint_every_steps`)
# of training; SIGTERM and Ctrl-C still checkpoint the step they stop at.
ACCELERATOR_MIN_INTERVAL_S = 60.0


def min_interval_s(config, platform: str) -> float:
  """Seconds at least between periodic checkpoints: the config's, else the platform's."""
  if config.checkpoint_min_interval_s is not None:
    return float(config.checkpoint_min_interval_s)
  return 0.0 if platform == 'cpu' else ACCELERATOR_MIN_INTERVAL_S


def make_manager(workdir: str, *, keep: int, create: bool = True) -> ocp.CheckpointManager:
  """An Orbax manager of `workdir/checkpoints`. Every process must call it at the same point:
  constructing one synchronises all processes."""
  # Synchronous saves: under load, Orbax's background finalize thread was seen to fail reading
  # the array metadata of a temporary directory it had already renamed (orbax 0.12.8, a 2-core
  # CPU running 4 simulated devices). A synchronous save blocks training for one write every
  # `checkpoint_every_steps`, and a failure surfaces at the step that caused it.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=create, enable_async_checkpointing=False
  )
  # A single, standard pytree item: lets `item_metadata` describe the tree without a restore.
  return ocp.CheckpointManager(
    workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def steps(workdir: str) -> list[int]:
  """The finished checkpoints' steps, ascending, read from the directory listing alone.

  Orbax renames a checkpoint to its step number only once it is complete, so temporary
  directories of an interrupted save are never listed. No manager is built (that would be a
  barrier): callers on several hosts wrap this in `distributed.agree`.
  """
  directory = workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def latest_step(workdir: str) -> int | None:
  found = steps(workdir)
  return found[-1] if found else None


def save(manager: ocp.CheckpointManager, workdir: str, step: int, state: Any) -> None:
  """Records the state's digest, then saves it as checkpoint `step` (asynchronously)."""
  try:
    record_digest(workdir, step, state)
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
  except Exception as e:  # noqa: BLE001 - a full disk surfaces as many types, from any layer
    raise _write_error(workdir, step, e) from None


def finish(manager: ocp.CheckpointManager, workdir: str, step: int) -> None:
  """Waits for the last save to land, then closes the manager."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _write_error(workdir, step, e) from None
  finally:
    manager.close()


def _write_error(workdir: str, step: int, error: Exception) -> CheckpointError:
  intact = latest_step(workdir)
  kept = 'no checkpoint is kept' if intact is None else f'the last intact checkpoint is {intact}'
  where = workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR)
  return CheckpointError(f'cannot write checkpoint {step} to {where}: {_one_line(error)}; {kept}')


def set_aside_after(workdir: str, step: int) -> list[int]:
  """Moves the checkpoints after `step` to `WORKDIR/superseded/<step>` (kept, never deleted).

  Used when a user resumes from an earlier checkpoint on purpose (`--resume_step`), e.g. past a
  corrupt latest one: training then continues from `step` and writes new checkpoints in their
  place. Process 0 moves; callers synchronise afterwards.
  """
  later = [s for s in steps(workdir) if s > step]
  if later and distributed.is_leader():
    aside = workdir_lib.path(workdir, workdir_lib.SUPERSEDED_DIR)
    aside.mkdir(parents=True, exist_ok=True)
    for s in later:
      workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR, str(s)).rename(aside / str(s))
      logging.warning('Moved checkpoint %d of %s to %s (resuming at %d).', s, workdir, aside, step)
  return later


def tree_digest(tree: Any) -> str:
  """SHA-256 of every array of a pytree, with its path, dtype and shape, in tree order.

  Works on several hosts for replicated arrays: each process hashes its own full copy.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def record_digest(workdir: str, step: int, state: Any) -> None:
  """Stores the digest of the state about to be saved as checkpoint `step` (process 0 writes).

  Written before the checkpoint: a checkpoint never exists without its digest.
  """
  digest = tree_digest(state)
  if not distributed.is_leader():
    return
  table = _digests(workdir)
  kept = set(steps(workdir))
  table = {k: v for k, v in table.items() if int(k) in kept}
  table[str(step)] = digest
  workdir_lib.write_json(workdir, workdir_lib.CHECKSUMS_FILE, table)


def _digests(workdir: str) -> dict[str, str]:
  if not workdir_lib.exists(workdir, workdir_lib.CHECKSUMS_FILE):
    return {}
  return workdir_lib.read_json(workdir, workdir_lib.CHECKSUMS_FILE)


def verify_digest(workdir: str, step: int, state: Any) -> None:
  """Raises CheckpointError when restored checkpoint `step` differs from its recorded digest."""
  expected = _digests(workdir).get(str(step))
  if expected is None:
    # Checkpoints written before digests existed; nothing to compare with.
    logging.warning('Checkpoint %d in %s has no recorded checksum; not verified.', step, workdir)
    return
  if tree_digest(state) != expected:
    earlier = [s for s in steps(workdir) if s < step]
    hint = (
      f'; resume from an earlier one with --resume_step={earlier[-1]}'
      if earlier
      else '; no earlier checkpoint exists'
    )
    raise CheckpointError(
      f'checkpoint {step} in {workdir!r} is corrupt: its arrays do not match the checksum '
      f'written with it{hint}'
    )


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, where: str, verify: bool = True
) -> Any:
  """Restores `step` into the structure, shapes and shardings of `abstract_state`, verified
  against its recorded checksum unless `verify` is False.

  A checkpoint whose tree or shapes differ from the model's raises CheckpointError naming the
  first mismatched parameter; an unreadable or corrupt one raises CheckpointError too.
  """
  try:
    metadata = manager.item_metadata(step)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable checkpoints
    raise CheckpointError(f'checkpoint {step} in {where!r} is unreadable: {_one_line(e)}') from None
  if metadata is not None:
    check_compatible(metadata, abstract_state, where)
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
      f'checkpoint {step} in {where!r} cannot be restored: {_one_line(e)}'
    ) from None
  if verify:
    verify_digest(where, step, state)
  return state


def _one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line.split('See full TensorStore details')[0].strip()[:300]


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def check_compatible(found: Any, expected: Any, where: str, prefix: str = '') -> None:
  """Compares two pytrees of arrays/metadata by path and shape; raises on the first mismatch.

  `prefix` is prepended to parameter names in messages (when comparing subtrees).
  """
  found_leaves = {
    prefix + _path_str(p): getattr(v, 'shape', None)
    for p, v in jax.tree_util.tree_flatten_with_path(found)[0]
  }
  expected_leaves = {
    prefix + _path_str(p): getattr(v, 'shape', None)
    for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  for name, shape in expected_leaves.items():
    if name not in found_leaves:
      raise CheckpointError(
        f'checkpoint in {where!r} does not match the model: parameter {name} is missing from it'
      )
    if (
      found_leaves[name] is not None
      and shape is not None
      and tuple(found_leaves[name]) != tuple(shape)
    ):
      raise CheckpointError(
        f'checkpoint in {where!r} does not match the model: parameter {name} has shape '
        f'{tuple(found_leaves[name])} in the checkpoint but {tuple(shape)} in the model'
      )
  extra = sorted(set(found_leaves) - set(expected_leaves))
  if extra:
    raise CheckpointError(
      f'checkpoint in {where!r} does not match the model: it has parameter '
      f'{extra[0]} that the model lacks'
    )


def holds_training_state(workdir: str, stages: tuple[str, ...] = ()) -> bool:
  """Whether `workdir` (or one of its `stages` sub-directories) has a checkpoint or results.

  A config stored by an attempt that failed before its first checkpoint protects nothing, so
  it does not block a corrected command from starting over in the same workdir.
  """
  if workdir_lib.is_finished(workdir) or latest_step(workdir) is not None:
    return True
  return any(holds_training_state(workdir_lib.join(workdir, s)) for s in stages)


def differing_fields(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The flat fields in which `new` may not resume a run stored with `stored`: all that differ,
  but the resumable ones and, when both train without gates, the gate sections."""
  plain = trains_without_gates(stored) and trains_without_gates(new)
  return sorted(
    key
    for key in set(stored) | set(new)
    if key not in RESUMABLE_FIELDS
    and not (plain and key.startswith(GATE_SECTIONS))
    and stored.get(key) != new.get(key)
  )


def config_conflicts(config, workdir: str, stages: tuple[str, ...] = ()) -> str | None:
  """Why `config` may not resume the run in `workdir`, or None when it may (or nothing is there).

  Reads only files, builds no manager: safe inside `distributed.agree`.
  """
  if not workdir_lib.exists(workdir, workdir_lib.CONFIG_FILE):
    return None
  if not holds_training_state(workdir, stages):
    return None
  stored = configs.flatten(workdir_lib.load_config(workdir))
  new = configs.flatten(config)
  conflicts = differing_fields(stored, new)
  if not conflicts:
    return None
  shown = ', '.join(f'{k} (stored {stored.get(k)!r}, now {new.get(k)!r})' for k in conflicts[:4])
  more = f' and {len(conflicts) - 4} more' if len(conflicts) > 4 else ''
  return (
    f'workdir {workdir!r} holds a run with a different config: {shown}{more}; '
    'use a new --workdir or the same config to resume'
  )


def keep_stored_recipe(config, workdir: str, stages: tuple[str, ...] = ()):
  """`config`, or a copy with the stored run's value of every legacy.RECIPE_FIELDS field, when
  `workdir` holds that run's training state: a run saved by an older version (a field it lacks
  reads as legacy.LEGACY_VALUES; one whose default changed since is stored) resumes computing
  what it computed, instead of being refused as a different config."""
  if not workdir_lib.exists(workdir, workdir_lib.CONFIG_FILE):
    return config
  if not holds_training_state(workdir, stages):
    return config
  stored = configs.flatten(workdir_lib.load_config(workdir))  # legacy values filled in
  present = configs.flatten(config)
  kept = {
    k: stored[k]
    for k in legacy.RECIPE_FIELDS
    if k in stored and k in present and present[k] != stored[k]
  }
  if not kept:
    return config
  logging.info('resuming %r with the values it was trained with: %s', workdir, kept)
  config = copy.deepcopy(config)
  config.update_from_flattened_dict(kept)
  return config


def check_resume_config(config, workdir: str, stages: tuple[str, ...] = ()) -> None:
  """Raises UserError if `workdir` holds training state of a run with a conflicting config.

  On several hosts process 0 decides and every process raises alike.
  """
  conflict = distributed.agree(lambda: config_conflicts(config, workdir, stages) is not None)
  if conflict:
    raise UserError(config_conflicts(config, workdir, stages) or 'conflicting config')
