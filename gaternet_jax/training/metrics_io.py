"""Metric writers and progress reports: clu where it can run, a TensorFlow-free fallback elsewhere.

clu's metric writers import TensorFlow (its TensorBoard writer is tf.summary). Training must not
need TensorFlow (a GPU machine may not have it), so when clu cannot be imported the same calls go
to a small writer that logs through absl and writes TensorBoard event files with the `tensorboard`
package alone.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping

from absl import logging


def create_writer(workdir: str, *, just_logging: bool):
  """clu's default writer (TensorBoard events + logging), or the fallback without TensorFlow."""
  try:
    from clu import metric_writers  # noqa: PLC0415 - imports TensorFlow
  except ImportError:
    return _FallbackWriter(workdir, just_logging=just_logging)
  return metric_writers.create_default_writer(workdir, just_logging=just_logging)


def create_progress(num_train_steps: int, writer):
  """clu's ReportProgress (steps/s, ETA), or an equivalent without TensorFlow."""
  try:
    from clu import periodic_actions  # noqa: PLC0415 - imports clu.metric_writers
  except ImportError:
    return _FallbackProgress(num_train_steps, writer)
  return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer)


class _FallbackWriter:
  """The subset of clu's MetricWriter that training uses."""

  def __init__(self, workdir: str, *, just_logging: bool):
    self._events = None
    if not just_logging:
      try:
        from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: PLC0415
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415

        self._events = EventFileWriter(workdir)
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
      except ImportError:
        logging.warning('Neither TensorFlow nor tensorboard is installed: metrics are only logged.')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))
    if self._events is not None:
      values = [
        self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
      ]
      self._events.add_event(
        self._event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=self._summary_pb2.Summary(value=values)
        )
      )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('Hyperparameters: %s', dict(hparams))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


class _FallbackProgress:
  """Logs steps/s and the ETA every minute, and times named sections like clu's version."""

  def __init__(self, num_train_steps: int, writer, every_secs: float = 60.0):
    self._total, self._writer, self._every = num_train_steps, writer, every_secs
    self._last_time, self._last_step = time.time(), None
    self._excluded = 0.0

  def __call__(self, step: int) -> None:
    now = time.time()
    if self._last_step is None:
      self._last_time, self._last_step = now, step
      return
    if now - self._last_time < self._every and step < self._total:
      return
    elapsed = now - self._last_time - self._excluded
    rate = (step - self._last_step) / max(elapsed, 1e-9)
    eta = (self._total - step) / max(rate, 1e-9)
    logging.info(
      '%.1f steps/s, %.1f%% (%d/%d), ETA: %dm',
      rate,
      100 * step / self._total,
      step,
      self._total,
      eta // 60,
    )
    self._writer.write_scalars(step, {'steps_per_sec': rate})
    self._last_time, self._last_step, self._excluded = now, step, 0.0

  @contextlib.contextmanager
  def timed(self, name: str):
    """Excludes the time spent in the block (e.g. evaluation) from steps/s, like clu."""
    del name  # clu reports per-name fractions; the fallback only excludes the time
    start = time.time()
    try:
      yield
    finally:
      self._excluded += time.time() - start
