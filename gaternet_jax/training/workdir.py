"""Every file and folder name of a run directory, and all of its JSON reads and writes.

A run directory (`--workdir`) holds:

  config.json      the config the run was started with (checked on resume)
  plan.json        values derived from the config and the data (steps per epoch, ...)
  checkpoints/     Orbax checkpoints, `checkpoints/<step>/`
  checksums.json   a digest of every checkpoint's arrays, verified on restore
  results.json     the final evaluation; its presence marks a finished run
  lock.json        held by the run that is using the directory
  superseded/      checkpoints set aside when a run resumed from an earlier one on purpose
  events.out.*     TensorBoard events
  analysis/        what `gaternet analyze` writes

A gated config trains the paper's three stages in the sub-directories `STAGES`, each a run
directory of its own, and writes the joint stage's results to the top-level `results.json`.

All I/O goes through `etils.epath`, so a cloud-storage workdir (gs://...) shared by every host of a
pod works like a local folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from gaternet_jax.errors import CheckpointError, UserError

CONFIG_FILE = 'config.json'
PLAN_FILE = 'plan.json'
CHECKPOINT_DIR = 'checkpoints'
CHECKSUMS_FILE = 'checksums.json'
RESULTS_FILE = 'results.json'
LOCK_FILE = 'lock.json'
ANALYSIS_DIR = 'analysis'
SUPERSEDED_DIR = 'superseded'  # checkpoints set aside by --resume_step

STAGE_BACKBONE = 'stage1_backbone'
STAGE_GATER = 'stage2_gater'
STAGE_JOINT = 'stage3_joint'
STAGES = (STAGE_BACKBONE, STAGE_GATER, STAGE_JOINT)


def is_remote(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` is a URL (gs://, s3://, ...) rather than a local path."""
  return '://' in os.fspath(workdir)


def path(workdir: str | os.PathLike, *names: str) -> epath.Path:
  """`workdir/names...` as an `epath.Path`; a local workdir is made absolute."""
  text = os.fspath(workdir)
  root = epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(text))
  return root.joinpath(*names) if names else root


def join(workdir: str, *names: str) -> str:
  """`workdir/names...` as a string (what run directories are passed around as)."""
  return os.fspath(path(workdir, *names)) if is_remote(workdir) else os.path.join(workdir, *names)


def exists(workdir: str, *names: str) -> bool:
  return path(workdir, *names).exists()


def ensure_writable(workdir: str, process_index: int = 0) -> None:
  """Creates `workdir` and checks a file can be written there, or raises one clear UserError."""
  root = path(workdir)
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f'.write_probe_{process_index}'
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - local and remote file systems raise different types
    reason = getattr(e, 'strerror', None) or (str(e).splitlines()[0] if str(e) else '')
    raise UserError(f'workdir {workdir!r} is not writable: {reason or type(e).__name__}') from None


def write_json(workdir: str, name: str, obj: Any) -> None:
  """Writes `workdir/name` atomically (a temporary file, then a rename).

  Callers decide which process writes (on several hosts, process 0).
  """
  target = path(workdir, name)
  tmp = target.parent / (target.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(target)


def read_json(workdir: str, name: str) -> Any:
  """Reads `workdir/name`; raises CheckpointError with one line if it is missing or corrupt."""
  target = path(workdir, name)
  try:
    return json.loads(target.read_text())
  except FileNotFoundError:
    raise CheckpointError(f'no {name} in {workdir!r}') from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read {os.fspath(target)!r}: {str(e).splitlines()[0]}') from None


def save_config(config, workdir: str) -> None:
  write_json(workdir, CONFIG_FILE, json.loads(config.to_json_best_effort()))


def load_config(workdir: str):
  """The config stored beside a run's checkpoints, as a ConfigDict (lists back to tuples), with
  the value an older version used for each field it was saved without (legacy.py)."""
  import ml_collections  # noqa: PLC0415 - keeps this module importable without it

  from gaternet_jax import legacy  # noqa: PLC0415 - ml_collections, as above

  if not exists(workdir, CONFIG_FILE):
    raise CheckpointError(f'no {CONFIG_FILE} in {workdir!r}: not a gaternet workdir')
  stored = legacy.read_stored(read_json(workdir, CONFIG_FILE))
  return ml_collections.ConfigDict(_lists_to_tuples(stored))


def _lists_to_tuples(tree):
  if isinstance(tree, dict):
    return {k: _lists_to_tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(tree)
  return tree


def is_finished(workdir: str) -> bool:
  """A run is finished once its results.json exists."""
  return exists(workdir, RESULTS_FILE)


def read_results(workdir: str) -> dict[str, Any]:
  return read_json(workdir, RESULTS_FILE)
