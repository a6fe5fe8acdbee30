"""WorkdirLock: exclusion, stale take-over (dead pid, old heartbeat, corrupt file), heartbeat."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gaternet_jax.errors import UserError
from gaternet_jax.training import workdir_lock
from gaternet_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder(workdir):
  with open(os.path.join(workdir, LOCK_FILE)) as f:
    return json.load(f)


def _write_lock(workdir, **overrides):
  now = time.time()
  record = {
    'host': 'other-host',
    'pid': 4242,
    'token': 'f' * 32,
    'started': now,
    'heartbeat': now,
    'command': 'gaternet train\n--seed 1',
  }
  record.update(overrides)
  with open(os.path.join(workdir, LOCK_FILE), 'w') as f:
    json.dump(record, f)
  return record


def _assert_held(lock, *needles):
  with pytest.raises(UserError) as e:
    lock.acquire()
  message = str(e.value)
  assert '\n' not in message and 'in use' in message, message
  for needle in needles:
    assert str(needle) in message, message
  return message


@pytest.fixture
def warnings(monkeypatch):
  logged = []
  monkeypatch.setattr(workdir_lock.logging, 'warning', lambda msg, *a: logged.append(msg % a))
  return logged


def test_round_trip_and_context_manager(tmp_path):
  workdir = tmp_path / 'new' / 'run'  # Created on acquire.
  lock = WorkdirLock(workdir)
  lock.acquire()
  holder = _holder(workdir)
  assert holder['pid'] == os.getpid() and len(holder['token']) == 32
  assert holder['started'] <= holder['heartbeat'] <= time.time()
  lock.release()
  lock.release()  # Idempotent.
  assert os.listdir(workdir) == []
  with WorkdirLock(str(workdir)) as held:
    assert os.path.exists(held.path)
  assert os.listdir(workdir) == []


def test_second_lock_is_refused_until_the_first_releases(tmp_path):
  (tmp_path / 'ckpt').mkdir()
  first = WorkdirLock(tmp_path)
  first.acquire()
  second = WorkdirLock(tmp_path)
  _assert_held(second, f'pid {os.getpid()}', '--workdir')
  first.release()
  second.acquire()
  assert _holder(tmp_path)['token'] == second._record['token']
  second.release()
  assert os.listdir(tmp_path) == ['ckpt']  # Nothing else in the workdir is touched.


@pytest.mark.slow
def test_lock_held_by_another_process_then_taken_over_after_sigkill(tmp_path, warnings):
  code = (
    'import sys, time\n'
    'from gaternet_jax.training.workdir_lock import WorkdirLock\n'
    'WorkdirLock(sys.argv[1]).acquire()\n'
    'print("locked", flush=True)\n'
    'time.sleep(600)\n'
  )
  child = subprocess.Popen(
    [sys.executable, '-c', code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert child.stdout.readline().strip() == 'locked'
    _assert_held(WorkdirLock(tmp_path), f'pid {child.pid}')
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()  # Reaped: its pid is dead, not a zombie that os.kill(pid, 0) still finds.
    child.stdout.close()
  with WorkdirLock(tmp_path):
    assert _holder(tmp_path)['pid'] == os.getpid()
  assert any(f'pid {child.pid}' in w for w in warnings), warnings


def test_other_host_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path, warnings):
  _write_lock(tmp_path)
  _assert_held(WorkdirLock(tmp_path), 'pid 4242 on other-host', '`gaternet train --seed 1`')
  assert not warnings
  _write_lock(tmp_path, heartbeat=time.time() - 700)
  with WorkdirLock(tmp_path, stale_after_s=600):
    assert _holder(tmp_path)['pid'] == os.getpid()
  assert any('other-host' in w for w in warnings), warnings


def test_corrupt_lock_is_held_while_fresh_and_stale_when_old(tmp_path, warnings):
  path = tmp_path / LOCK_FILE
  path.write_text('{"host": "half-writ')
  _assert_held(WorkdirLock(tmp_path), 'pid ?')
  old = time.time() - 700
  os.utime(path, (old, old))
  with WorkdirLock(tmp_path, stale_after_s=600):
    assert _holder(tmp_path)['pid'] == os.getpid()
  assert warnings


def test_heartbeat_advances(tmp_path):
  with WorkdirLock(tmp_path, heartbeat_s=0.1) as lock:
    before = _holder(tmp_path)
    time.sleep(0.6)
    after = _holder(tmp_path)
    assert after['heartbeat'] > before['heartbeat']
    assert after['token'] == before['token'] == lock._record['token']
    assert after['started'] == before['started']
  assert os.listdir(tmp_path) == []  # No temporary files left behind.


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path, warnings):
  lock = WorkdirLock(tmp_path, heartbeat_s=0.05)
  lock.acquire()
  theirs = _write_lock(tmp_path, host='thief', pid=777)
  time.sleep(0.3)  # The heartbeat must notice and stop, not overwrite their lock.
  assert _holder(tmp_path) == theirs
  lock.release()
  assert _holder(tmp_path) == theirs
  assert any('Lost the lock' in w for w in warnings), warnings


def test_stale_removal_backs_off_when_the_lock_changed_after_the_read(tmp_path):
  # Two runs judged the same lock stale; the faster one already replaced it with a fresh lock.
  lock = WorkdirLock(tmp_path)
  stale = json.dumps({'stale': True}).encode()
  fresh = _write_lock(tmp_path)
  assert not lock._remove_if_unchanged(stale)
  assert _holder(tmp_path) == fresh
  assert os.listdir(tmp_path) == [LOCK_FILE]


def test_remote_code_path(tmp_path, monkeypatch):
  # The gs:// path uses only epath operations, so it can be exercised on a local directory.
  monkeypatch.setattr(workdir_lock, '_REMOTE_SETTLE_S', 0.0)
  first, second = WorkdirLock(tmp_path, heartbeat_s=0.05), WorkdirLock(tmp_path)
  first._remote = second._remote = True
  first.acquire()
  _assert_held(second, f'pid {os.getpid()}')
  time.sleep(0.2)
  first.release()
  assert os.listdir(tmp_path) == []
  _write_lock(tmp_path, heartbeat=time.time() - 700)
  with second:
    assert _holder(tmp_path)['token'] == second._record['token']
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  'overrides', [{'pid': 0}, {'pid': -1}, {'pid': True}, {'pid': '42'}, {'heartbeat': float('nan')}]
)
def test_malformed_fields_count_as_corrupt(tmp_path, overrides):
  # A pid of 0 or below must never reach os.kill, which would signal a whole process group.
  _write_lock(tmp_path, host=os.uname().nodename, **overrides)
  _assert_held(WorkdirLock(tmp_path), 'pid ?')
