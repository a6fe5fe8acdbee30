"""Stopping on SIGTERM / SIGINT: finish the step, checkpoint it on every host, exit 143 / 130.

A preemption (TPU/GPU scheduler, Kubernetes, SLURM) sends SIGTERM and waits a grace period; a
user presses Ctrl-C (SIGINT). Either way the loop finishes the step in flight, writes a checkpoint
of it and stops with a line saying how to resume, instead of losing up to
`checkpoint_every_steps` of work.

On one process a handler records the signal and the loop asks `should_stop(step)` after every
step. On several processes every host must stop at the *same* step: JAX's preemption service
(started by `jax.distributed.initialize`) owns SIGTERM there and agrees on a step through
`multihost_utils.reached_preemption_sync_point`; a SIGINT seen by any process is agreed on at
the next multiple of `sync_every` steps.

The preemption service expects one call per training step with ids that rise by one and never
restart in a process (it picks "the largest id seen + 1" as the step to stop at). The loop asks
once per *dispatch* (several steps) and the procedure runs several stages in one process, so the
service is given its own counter of `should_stop` calls, never the training step; every process
makes the same calls in the same order, so their counters agree.
"""

from __future__ import annotations

import itertools
import signal
import threading

import jax

# Ids for the preemption service: one per `should_stop` call of this process (see above).
_SYNC_IDS = itertools.count()


class StopRequests:
  """Context manager that turns SIGTERM/SIGINT into a stop request the loop polls.

  The previous handlers are restored on exit. Outside the main thread (where Python cannot set
  handlers) it only polls the multi-host preemption service.
  """

  def __init__(self, *, sync_every: int = 1):
    self._signal: int | None = None
    self._previous: dict[int, object] = {}
    self._sync_every = max(1, sync_every)

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      signals = [signal.SIGINT]
      if jax.process_count() == 1:
        signals.append(signal.SIGTERM)  # on several processes JAX's preemption service has it
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self._signal is not None and signum == signal.SIGINT:
      # A second Ctrl-C means "now": give the default behaviour back and raise at once.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self._signal = signum

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; the same answer on every process."""
    if jax.process_count() == 1:
      return self._signal is not None
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if multihost_utils.reached_preemption_sync_point(next(_SYNC_IDS)):
      self._signal = self._signal or signal.SIGTERM
      return True
    if step % self._sync_every:
      return False
    # Any process's Ctrl-C stops all: process 0 alone cannot see the others' signals, so sum.
    flags = multihost_utils.process_allgather(jax.numpy.int32(self._signal is not None))
    if int(jax.numpy.sum(flags)) > 0:
      self._signal = self._signal or signal.SIGINT
      return True
    return False

  @property
  def signal_name(self) -> str:
    return signal.Signals(self._signal).name if self._signal else 'a signal'

  @property
  def exit_code(self) -> int:
    """128 + the signal's number, the shell's convention (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(self._signal or signal.SIGTERM)
