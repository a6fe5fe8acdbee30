"""The multi-host stop decision (`preemption.StopRequests.should_stop`) with the JAX preemption
service and the all-gather faked: which ids the service sees and when the hosts stop. The real
service is exercised end to end by `test_multiprocess.py`. Then a command's signals on one
process: outside the training loop, inside it, and during its last step."""

import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from gaternet_jax.errors import Interrupted, StopSignal
from gaternet_jax.training import preemption


@pytest.fixture
def two_hosts(monkeypatch):
  """Two processes; returns the ids given to the service and the other host's flags to set."""
  ids, other = [], {'flags': [0, 0], 'sync_point': None}
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(
    multihost_utils,
    'reached_preemption_sync_point',
    lambda step_id: ids.append(step_id) or step_id == other['sync_point'],
  )
  monkeypatch.setattr(
    multihost_utils,
    'process_allgather',
    lambda x: np.stack([np.asarray(x), np.asarray(other['flags'], np.int32)]),
  )
  monkeypatch.setattr(preemption, '_preemption_notice_posted', lambda: False)
  return ids, other


def test_the_service_sees_every_training_step_and_stops_at_its_sync_point(two_hosts):
  """Ids are training steps, one per step (Orbax reports checkpoint steps to the same service):
  a dispatch of several steps passes each of them."""
  ids, other = two_hosts
  other['sync_point'] = 7
  stop = preemption.StopRequests(start_step=2, sync_every=100)
  assert not stop.should_stop(4)
  assert stop.should_stop(8)  # the dispatch of steps 5-8 holds the sync point
  assert ids == [3, 4, 5, 6, 7, 8]
  assert stop.signal_name == 'SIGTERM' and stop.exit_code == 143


@pytest.mark.parametrize('flags,name,code', [([0, 1], 'SIGTERM', 143), ([1, 0], 'SIGINT', 130)])
def test_another_hosts_notice_or_ctrl_c_stops_both_at_the_agreement_step(
  two_hosts, flags, name, code
):
  """A notice the sync point missed (it landed between two stages) or a Ctrl-C on the other host
  stops this one too, at the next multiple of `sync_every`."""
  _, other = two_hosts
  other['flags'] = flags
  stop = preemption.StopRequests(start_step=0, sync_every=5)
  assert not stop.should_stop(3)  # not an agreement step: no all-gather
  assert stop.should_stop(5)
  assert stop.signal_name == name and stop.exit_code == code


def test_no_notice_without_a_distributed_client():
  assert preemption._preemption_notice_posted() is False


@pytest.mark.parametrize('sig,code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_outside_the_training_loop_stops_the_command_at_once(sig, code):
  before = signal.getsignal(signal.SIGINT)
  with preemption.CommandSignals():
    with pytest.raises(StopSignal) as stopped:
      try:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises long before this ends
      except Exception:  # noqa: BLE001 - what swallowed it when it was an Exception
        pytest.fail('an `except Exception` caught the stop')
  assert stopped.value.exit_code == code and 'run the same command again' in str(stopped.value)
  assert signal.getsignal(signal.SIGINT) is before  # restored


def test_the_training_loop_takes_the_commands_signals_over():
  with preemption.CommandSignals():
    # The loop polls the signal and stops by raising its own Interrupted (train.run); its exit
    # raises nothing more.
    with pytest.raises(Interrupted, match='at step 1'):
      with preemption.StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.should_stop(1) and stop.exit_code == 143
        raise Interrupted('stopped at step 1', stop.exit_code)


def test_a_signal_during_the_last_step_is_not_lost():
  # The last step is past the loop's last should_stop: the signal stops the command on exit.
  with preemption.CommandSignals():
    with pytest.raises(Interrupted) as stopped:
      with preemption.StopRequests():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    assert stopped.value.exit_code == 130 and 'after the last training step' in str(stopped.value)
    # Outside the loop again: the command's own handler is back.
    with pytest.raises(StopSignal, match='outside the training loop'):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # the swallowing
def test_a_signal_whose_raise_was_swallowed_stops_at_the_next_boundary():
  # Python ignores what a handler raises when it runs inside a weakref callback or __del__ (a
  # Ctrl-C between two stages was lost that way): the boundary check raises it again.
  class Owner:
    pass

  with preemption.CommandSignals():
    preemption.check_stop()  # nothing pending: nothing raised
    owner = Owner()
    # The callback runs when `owner` dies; the signal arrives (is handled) inside it.
    finalizer = weakref.ref(owner, lambda _: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(1)))
    del owner
    assert finalizer() is None
    with pytest.raises(StopSignal, match='SIGTERM outside the training loop') as stopped:
      preemption.check_stop()
  assert stopped.value.exit_code == 143
  preemption.check_stop()  # no command installed any more: nothing pending


# A program whose XLA compile is one long C++ call (over a minute on the 2-core CPU): the
# command's handler cannot run until it returns.
SLOW_COMPILE = """
import sys, jax, jax.numpy as jnp
from gaternet_jax.training import preemption

def f(x):
  for i in range(1500):
    x = jnp.sin(x @ x + i) * jnp.cos(x[::-1])
  return x

lowered = jax.jit(f).lower(jnp.ones((8, 8)))
with preemption.CommandSignals(), preemption.exit_at_once_on_signal('the test compile'):
  print('compiling', flush=True)
  lowered.compile()
print('compiled', flush=True)
"""


@pytest.mark.parametrize('sig, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_long_compile_ends_the_process_at_once(sig, code):
  process = subprocess.Popen(
    [sys.executable, '-c', SLOW_COMPILE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    assert process.stdout.readline() == 'compiling\n'
    time.sleep(0.5)  # inside the compile
    sent = time.monotonic()
    process.send_signal(sig)
    out, err = process.communicate(timeout=30)  # without the watcher: > 60 s
    assert time.monotonic() - sent < 5.0  # not when the compile returns
  finally:
    process.kill()
  assert process.returncode == code and out == ''
  name = signal.Signals(sig).name
  assert err.strip().splitlines()[-1] == (
    f'gaternet: stopped by {name} during the test compile; nothing was written'
  )


def test_without_a_signal_the_wakeup_fd_and_the_watcher_are_gone_after():
  with preemption.exit_at_once_on_signal('nothing'):
    assert any(t.name == 'exit-on-signal' for t in threading.enumerate())
  assert not any(t.name == 'exit-on-signal' for t in threading.enumerate())
  assert signal.set_wakeup_fd(-1) == -1  # restored: nothing was set before
