"""A lock file that keeps two `gaternet train` runs out of one workdir.

Without it two runs on one workdir both succeed and the later one silently replaces the other's
checkpoints. One process per run holds `WORKDIR/lock.json` for the whole run (on a multi-host run
the caller locks on process 0 only) and refreshes a heartbeat in it, so that a lock left behind by
a run that died can be recognised as stale and taken over. Pure Python: no JAX import.
"""

import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from typing import Self

from absl import logging
from etils import epath

from gaternet_jax.errors import UserError
from gaternet_jax.training.workdir import LOCK_FILE

# How long a remote acquire waits before reading the lock back, so that a run that passed the
# existence check at about the same time has had its rename land and the loser can see it lost.
_REMOTE_SETTLE_S = 1.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # The process exists but belongs to another user.
    return True
  return True


def _parse(raw: bytes) -> dict | None:
  """Returns the lock record, or None when the file is not a well-formed one."""
  try:
    record = json.loads(raw)
  except ValueError:
    return None
  if not isinstance(record, dict):
    return None
  strings = all(isinstance(record.get(k), str) for k in ('host', 'token', 'command'))
  times = all(
    type(record.get(k)) in (int, float) and math.isfinite(record[k])
    for k in ('started', 'heartbeat')
  )
  # A pid <= 0 would make os.kill signal a whole process group: never trust one.
  pid = type(record.get('pid')) is int and record['pid'] > 0
  return record if strings and times and pid else None


class WorkdirLock:
  """An exclusive lock on a workdir, held by one process for the whole run.

  Use it as a context manager. Acquiring raises `UserError` when a live run holds the workdir.
  """

  def __init__(
    self, workdir: epath.Path | str, *, stale_after_s: float = 600.0, heartbeat_s: float = 60.0
  ):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._remote = '://' in str(workdir)
    self._stale_after_s = stale_after_s
    self._heartbeat_s = heartbeat_s
    self._record = None
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> Self:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock, taking over a stale one; raises `UserError` if a live run holds it."""
    if self._record is not None:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'token': uuid.uuid4().hex,
      'started': now,
      'heartbeat': now,
      'command': ' '.join(sys.argv),
    }
    if not self._create(record):
      raw, holder, mtime = self._read()
      if raw is not None:  # None: the holder released it meanwhile, so just retry the create.
        if not self._is_stale(holder, mtime):
          raise self._held_error(holder)
        logging.warning(
          'Taking over the stale lock %s of %s',
          self.path,
          f'pid {holder["pid"]} on {holder["host"]}' if holder else 'unknown run',
        )
        if not self._remove_if_unchanged(raw):
          raise self._held_error(self._read()[1])
      # One retry only: losing it means another run took the lock over first, and now holds it.
      if not self._create(record):
        raise self._held_error(self._read()[1])
    self._record = record
    self._stop.clear()
    self._thread = threading.Thread(
      target=self._heartbeat_loop, name='workdir-lock-heartbeat', daemon=True
    )
    self._thread.start()

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still ours; idempotent."""
    if self._record is None:
      return
    self._stop.set()
    self._thread.join()
    token, self._record, self._thread = self._record['token'], None, None
    holder = self._read()[1]
    # A run that judged us stale may have taken the lock over: its file is not ours to remove.
    if holder is not None and holder['token'] == token:
      self.path.unlink(missing_ok=True)

  def _tmp(self, tag: str) -> epath.Path:
    return self.path.with_name(f'{LOCK_FILE}.{uuid.uuid4().hex}.{tag}')

  def _write(self, path: epath.Path, record: dict) -> None:
    data = json.dumps(record).encode()
    if self._remote:
      path.write_bytes(data)
      return
    with open(path, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())

  def _create(self, record: dict) -> bool:
    """Creates the lock file holding `record`; False if one exists."""
    if not self._remote:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      # Until this write lands the file is empty; readers then see a fresh corrupt file, held.
      try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
      finally:
        os.close(fd)
      return True
    # Object stores have no exclusive create: two runs can both pass the existence check and the
    # later rename wins. Reading back after a pause lets the loser see that it lost. Best effort,
    # not a guarantee; runs started seconds apart (the case that matters) are caught reliably.
    tmp = self._tmp('tmp')
    self._write(tmp, record)
    if self.path.exists():
      tmp.unlink(missing_ok=True)
      return False
    tmp.replace(self.path)
    time.sleep(_REMOTE_SETTLE_S)
    holder = self._read()[1]
    return holder is not None and holder['token'] == record['token']

  def _read(self) -> tuple[bytes | None, dict | None, float | None]:
    """Returns (raw bytes, parsed record or None if corrupt, mtime), all None if missing."""
    try:
      raw = self.path.read_bytes()
      stat = self.path.stat()
    except FileNotFoundError:
      return None, None, None
    return raw, _parse(raw), stat.st_mtime if hasattr(stat, 'st_mtime') else stat.mtime

  def _is_stale(self, holder: dict | None, mtime: float) -> bool:
    now = time.time()
    if holder is None:
      return now - mtime > self._stale_after_s
    if now - holder['heartbeat'] > self._stale_after_s:  # Its run died, possibly on another host.
      return True
    return holder['host'] == socket.gethostname() and not _pid_alive(holder['pid'])

  def _remove_if_unchanged(self, raw: bytes) -> bool:
    """Removes the stale lock file if it still holds `raw`; False if another run now holds it."""
    if self._remote:
      self.path.unlink(missing_ok=True)  # Best effort, as for the remote create.
      return True
    # Two runs may judge the same file stale: a plain unlink could then remove the fresh lock the
    # faster one has just created. Renaming aside is atomic, so we can check what we removed.
    aside = self._tmp('stale')
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:  # Another run removed it first; the create decides who wins.
      return True
    try:
      if aside.read_bytes() == raw:
        return True
      try:  # We moved a lock taken (or refreshed) after our read: put it back.
        os.link(aside, self.path)
      except FileExistsError:  # A third run has created one meanwhile; it holds the lock.
        pass
      return False
    finally:
      aside.unlink(missing_ok=True)

  def _held_error(self, holder: dict | None) -> UserError:
    if holder is None:
      pid, host, started, command = '?', '?', 'at an unknown time', 'unreadable lock file'
    else:
      pid, host, command = holder['pid'], holder['host'], holder['command']
      started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))
    command = ' '.join(command.split())  # Keep the message on one line.
    return UserError(
      f'workdir {self.workdir} is in use by another gaternet run (pid {pid} on {host}, '
      f'started {started}, `{command}`); wait for it to finish, stop it, or use another --workdir'
    )

  def _heartbeat_loop(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        holder = self._read()[1]
        if holder is None or holder['token'] != self._record['token']:
          logging.warning('Lost the lock %s to another run; no longer refreshing it', self.path)
          return
        # Temp file + replace so that readers never see a half-written lock. (A take-over landing
        # between the read above and the replace would be overwritten: a narrow window.)
        self._record['heartbeat'] = time.time()
        tmp = self._tmp('tmp')
        try:
          self._write(tmp, self._record)
          tmp.replace(self.path)
        finally:
          tmp.unlink(missing_ok=True)  # Left over only if the write or replace failed.
      except Exception as e:  # noqa: BLE001 - local and remote file systems raise different types
        # A transient storage error must not kill the run; the next beat retries.
        logging.warning('Could not refresh the lock %s: %s', self.path, e)
