"""Orbax checkpoints, the run's stored config, and initialisation from pre-trained runs.

A workdir holds `config.json` (the config the run was started with), `checkpoints/<step>/` (Orbax,
written atomically: a checkpoint directory appears only once complete, so a run killed mid-save
leaves the previous checkpoints intact), TensorBoard events and, at the end, `results.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from gaternet_jax.errors import CheckpointError, UserError

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
RESULTS_FILE = 'results.json'

# Fields a resumed run may change without conflicting with the stored config: they affect
# logging, cadence and where data is read from, not what is trained.
RESUMABLE_FIELDS = frozenset(
  {
    'log_every_steps',
    'eval_every_epochs',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'data.data_dir',
    'eval_batch_size',
    'init.backbone',
    'init.gater',
  }
)


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and checks a file can be written there, or raises one clear UserError."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from None


def flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for a (nested) ConfigDict or dict; tuples become lists (as in JSON)."""
  items = config.items() if hasattr(config, 'items') else []
  out = {}
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, CONFIG_FILE + '.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored beside a run's checkpoints."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'no {CONFIG_FILE} in {workdir!r}: not a gaternet workdir') from None
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'cannot read {path!r}: {e}') from None
  return ml_collections.ConfigDict(_lists_to_tuples(stored))


def _lists_to_tuples(tree):
  if isinstance(tree, dict):
    return {k: _lists_to_tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(tree)
  return tree


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises UserError if `workdir` holds a run started with a conflicting config."""
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return
  stored = flatten(load_config(workdir))
  new = flatten(config)
  conflicts = sorted(
    key
    for key in set(stored) | set(new)
    if key not in RESUMABLE_FIELDS and stored.get(key) != new.get(key)
  )
  if conflicts:
    shown = ', '.join(f'{k} (stored {stored.get(k)!r}, now {new.get(k)!r})' for k in conflicts[:4])
    more = f' and {len(conflicts) - 4} more' if len(conflicts) > 4 else ''
    raise UserError(
      f'workdir {workdir!r} holds a run with a different config: {shown}{more}; '
      'use a new --workdir or the same config to resume'
    )


def make_manager(workdir: str, *, keep: int, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  # A single, standard pytree item: lets `item_metadata` describe the tree without a restore.
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def latest_step(workdir: str) -> int | None:
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    return manager.latest_step()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, where: str) -> Any:
  """Restores `step` into the structure, shapes and shardings of `abstract_state`.

  A checkpoint whose tree or shapes differ from the model's raises CheckpointError naming the
  first mismatched parameter; an unreadable one raises CheckpointError too.
  """
  try:
    metadata = manager.item_metadata(step)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable checkpoints
    raise CheckpointError(f'checkpoint {step} in {where!r} is unreadable: {_one_line(e)}') from None
  if metadata is not None:
    check_compatible(metadata, abstract_state, where)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
      f'checkpoint {step} in {where!r} cannot be restored: {_one_line(e)}'
    ) from None


def _one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


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
