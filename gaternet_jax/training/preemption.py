"""Stopping on SIGTERM / SIGINT: finish the step, checkpoint it on every host, exit 143 / 130.

A preemption (TPU/GPU scheduler, Kubernetes, SLURM) sends SIGTERM and waits a grace period; a
user presses Ctrl-C (SIGINT). Either way the loop finishes the step in flight, writes a checkpoint
of it and stops with a line saying how to resume, instead of losing up to
`checkpoint_every_steps` of work.

On one process a handler records the signal and the loop asks `should_stop(step)` after every
dispatch. On several processes every host must stop at the *same* step, and JAX's preemption
service (started by `jax.distributed.initialize`) owns SIGTERM there: the host that gets it posts
a notice to the coordination service, every host then reports the last id it passed to
`multihost_utils.reached_preemption_sync_point` and the service answers True at "the largest id
+ 1". The ids must be training steps, one per step: Orbax's CheckpointManager reports the step
of every checkpoint it saves to the same service, so any other numbering gets a sync point that
is never reached (it did: with one id per `should_stop` call, a notice during the procedure's
joint stage was set to stage 2's last step + 1 and ignored). So `should_stop` passes every step
of the dispatch that just ran. A stage restarts its steps at 0, and a notice that lands between
two stages gets a sync point the next stage may never reach; so every `sync_every` steps the hosts
also agree (one all-gather) on whether any of them saw the service's notice or a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np

from gaternet_jax.errors import Interrupted, StopSignal

# The coordination-service key JAX's preemption service writes when a host is told it will be
# preempted (`kPreemptionNoticeKey` in XLA's tsl preemption_sync_manager.cc).
PREEMPTION_NOTICE_KEY = 'RECEIVED_PREEMPTION_NOTICE'


# The CommandSignals of the command this process runs, while one is installed (signal handlers
# are process-wide, so this is the one place that knows whether a training loop is polling).
_command: CommandSignals | None = None


class CommandSignals:
  """SIGTERM/SIGINT for a whole command: never ignored, never a traceback.

  Installed by the CLI around a command (main thread). While a training loop runs, its
  StopRequests takes the signal and stops at the next step boundary with a checkpoint. Anywhere
  else (setup, compilation, between the stages of a procedure or the runs of a sweep, evaluation)
  the command stops at once with `StopSignal`: finished runs and checkpoints are on disk, so the
  same command resumes. On several processes SIGTERM belongs to JAX's preemption service.
  """

  def __init__(self):
    self._previous: dict[int, object] = {}
    self.loop: StopRequests | None = None
    self.pending: int | None = None  # a signal that came outside a training loop

  def __enter__(self) -> CommandSignals:
    global _command
    if threading.current_thread() is threading.main_thread():
      signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
      _command = self
    return self

  def __exit__(self, *exc_info) -> None:
    global _command
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    _command = None

  def _handle(self, signum, frame) -> None:
    if self.loop is not None:
      self.loop._handle(signum, frame)  # noqa: SLF001 - the loop's own handler, delegated
      return
    self.pending = self.pending or signum
    # Raised at once where the main thread can raise. Python runs handlers between any two
    # bytecodes, also inside a weakref callback or __del__, where it prints and ignores what they
    # raise (a Ctrl-C between two stages was lost that way): `check_stop` raises it again at the
    # next boundary (between stages and runs, before a training loop).
    raise self.stop_signal()

  def stop_signal(self) -> StopSignal:
    return StopSignal(
      f'stopped by {signal.Signals(self.pending).name} outside the training loop; finished runs '
      'and checkpoints are kept: run the same command again to resume',
      128 + self.pending,
    )


@contextlib.contextmanager
def exit_at_once_on_signal(what: str):
  """SIGINT/SIGTERM end the process at once, with one line, while the main thread is in `what`:
  one long C++ call that writes nothing (the XLA compile of `gaternet compile`, 1-13 minutes for
  a TPU slice on a laptop CPU). Never around work that writes files: nothing is flushed.

  Python runs a signal's handler between two bytecodes, so while the main thread is inside such
  a call the command's handler waits for it to return (measured: a SIGTERM 6 s into a 21 s XLA
  compile took effect 15 s later, when the compile returned). The C half of Python's handler
  writes the signal's number at once to `signal.set_wakeup_fd`'s pipe: a thread reading that pipe
  ends the process.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  stop_signals = (signal.SIGINT, signal.SIGTERM)
  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)  # set_wakeup_fd's requirement: a signal never blocks

  def watch():
    while data := os.read(read_end, 1):  # b'' once write_end is closed: the work is done
      if data[0] in stop_signals:
        name = signal.Signals(data[0]).name
        # os.write, not print: the main thread may hold sys.stderr's lock.
        os.write(2, f'gaternet: stopped by {name} during {what}; nothing was written\n'.encode())
        os._exit(128 + data[0])  # the main thread cannot unwind from inside C++

  watcher = threading.Thread(target=watch, name='exit-on-signal', daemon=True)
  watcher.start()
  previous = signal.set_wakeup_fd(write_end)
  try:
    yield
  finally:
    # The two signals held back while the watcher is taken down, so the command's handler cannot
    # cut the cleanup short; one that came meanwhile reaches that handler right after.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
      signal.set_wakeup_fd(previous)
      os.close(write_end)
      watcher.join()
      os.close(read_end)
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, held)


def check_stop() -> None:
  """Raises the command's StopSignal if it got SIGTERM/SIGINT outside a training loop.

  Called at the boundaries of a command's work (before a training loop, between the stages of a
  procedure and the runs of a sweep): a signal whose immediate raise was swallowed stops there.
  """
  if _command is not None and _command.pending is not None:
    raise _command.stop_signal()


class StopRequests:
  """Context manager that turns SIGTERM/SIGINT into a stop request the loop polls.

  Under a CommandSignals it takes the command's signals over; otherwise (a library call) it
  installs its own handlers and restores the previous ones on exit. Outside the main thread
  (where Python cannot set handlers) it only polls the multi-host preemption service. A signal
  that arrives after the last `should_stop` (during the final step) is raised as `Interrupted` on
  exit, once that step is checkpointed, so it is never lost.
  """

  def __init__(self, *, start_step: int = 0, sync_every: int = 1):
    self._signal: int | None = None
    self._previous: dict[int, object] = {}
    self._sync_every = max(1, sync_every)
    self._polled = start_step  # the preemption service has seen every step up to this one

  def __enter__(self) -> StopRequests:
    if _command is not None and threading.current_thread() is threading.main_thread():
      _command.loop = self
    elif threading.current_thread() is threading.main_thread():
      signals = [signal.SIGINT]
      if jax.process_count() == 1:
        signals.append(signal.SIGTERM)  # on several processes JAX's preemption service has it
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, exc_type, *exc_info) -> None:
    if _command is not None and _command.loop is self:
      _command.loop = None
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    if exc_type is None and self._signal is not None and jax.process_count() == 1:
      raise Interrupted(
        f'stopped by {self.signal_name} after the last training step, which is checkpointed; '
        'run the same command again to finish',
        self.exit_code,
      )

  def _handle(self, signum, frame) -> None:
    del frame
    if self._signal is not None and signum == signal.SIGINT:
      # A second Ctrl-C means "now": stop at once (the last checkpoint stays on disk).
      raise StopSignal('stopped at once by a second SIGINT; the last checkpoint is kept', 130)
    self._signal = signum

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; the same answer on every process."""
    if jax.process_count() == 1:
      return self._signal is not None
    from jax.experimental import multihost_utils  # noqa: PLC0415

    reached = False
    for s in range(self._polled + 1, step + 1):  # one id per training step, as Orbax uses
      reached |= multihost_utils.reached_preemption_sync_point(s)
    self._polled = step
    if reached:
      self._signal = self._signal or signal.SIGTERM
      return True
    if step % self._sync_every:
      return False
    # Any process's Ctrl-C or a notice the sync point missed stops all: process 0 alone cannot
    # see the others' signals, so every process contributes its flags.
    local = np.array([self._signal is not None, _preemption_notice_posted()], np.int32)
    flags = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2)
    interrupted, noticed = flags.any(axis=0)
    if interrupted or noticed:
      self._signal = self._signal or (signal.SIGINT if interrupted else signal.SIGTERM)
      return True
    return False

  @property
  def signal_name(self) -> str:
    return signal.Signals(self._signal).name if self._signal else 'a signal'

  @property
  def exit_code(self) -> int:
    """128 + the signal's number, the shell's convention (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(self._signal or signal.SIGTERM)


def _preemption_notice_posted() -> bool:
  """Whether JAX's preemption service has posted a notice in this job (any host)."""
  from jax._src import distributed  # noqa: PLC0415 - the client has no public accessor

  client = distributed.global_state.client
  if client is None:
    return False
  try:
    return client.key_value_try_get(PREEMPTION_NOTICE_KEY) is not None
  except Exception:  # noqa: BLE001 - NOT_FOUND comes as a runtime error of the C++ client
    return False
