"""Orbax checkpoints, the run's stored config, and initialisation from pre-trained runs.

A workdir holds `config.json` (the config the run was started with), `checkpoints/<step>/` (Orbax,
written atomically: a checkpoint directory appears only once complete, so a run killed mid-save
leaves the previous checkpoints intact), TensorBoard events and, at the end, `results.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath
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


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """A workdir as an `epath.Path`: a local folder (made absolute) or a URL such as gs://bucket/x.

  All workdir I/O goes through epath, so a cloud-storage workdir shared by every host of a pod
  works like a local folder.
  """
  text = os.fspath(workdir)
  return epath.Path(text) if '://' in text else epath.Path(os.path.abspath(text))


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and checks a file can be written there, or raises one clear UserError."""
  path = workdir_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - local and remote file systems raise different types
    reason = getattr(e, 'strerror', None) or str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f'workdir {workdir!r} is not writable: {reason}') from None


def write_json(workdir: str, name: str, obj: Any) -> None:
  """Writes `workdir/name` atomically (temporary file, then rename), from process 0 only."""
  if jax.process_index() != 0:
    return
  path = workdir_path(workdir)
  tmp = path / (name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path / name)


def read_json(workdir: str, name: str) -> Any:
  """Reads `workdir/name`; raises CheckpointError with one line if it is missing or corrupt."""
  path = workdir_path(workdir) / name
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(f'no {name} in {workdir!r}') from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read {os.fspath(path)!r}: {str(e).splitlines()[0]}') from None


def exists(workdir: str, name: str = '') -> bool:
  return (workdir_path(workdir) / name).exists() if name else workdir_path(workdir).exists()


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
  write_json(workdir, CONFIG_FILE, json.loads(config.to_json_best_effort()))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored beside a run's checkpoints."""
  if not exists(workdir, CONFIG_FILE):
    raise CheckpointError(f'no {CONFIG_FILE} in {workdir!r}: not a gaternet workdir')
  return ml_collections.ConfigDict(_lists_to_tuples(read_json(workdir, CONFIG_FILE)))


def holds_training_state(workdir: str, stages: tuple[str, ...] = ()) -> bool:
  """Whether `workdir` (or one of its `stages` sub-directories) has a checkpoint or results.

  A config stored by an attempt that failed before its first checkpoint protects nothing, so
  it does not block a corrected command from starting over in the same workdir.
  """
  if exists(workdir, RESULTS_FILE) or latest_step(workdir) is not None:
    return True
  return any(holds_training_state(os.path.join(workdir, s)) for s in stages)


def _lists_to_tuples(tree):
  if isinstance(tree, dict):
    return {k: _lists_to_tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(tree)
  return tree


def check_resume_config(
  config: ml_collections.ConfigDict, workdir: str, stages: tuple[str, ...] = ()
) -> None:
  """Raises UserError if `workdir` holds training state of a run with a conflicting config."""
  if not exists(workdir, CONFIG_FILE) or not holds_training_state(workdir, stages):
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
    workdir_path(workdir) / CHECKPOINT_DIR,
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def latest_step(workdir: str) -> int | None:
  directory = workdir_path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return None
  with ocp.CheckpointManager(directory) as manager:
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
