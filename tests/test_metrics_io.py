"""The TensorFlow-free metric writer and progress report used when clu cannot be imported."""

import glob
import time

from gaternet_jax.training import metrics_io


def test_fallback_writer_and_progress(tmp_path):
  writer = metrics_io._FallbackWriter(str(tmp_path), just_logging=False)  # noqa: SLF001
  progress = metrics_io._FallbackProgress(10, writer, every_secs=0.0)  # noqa: SLF001
  for step in range(1, 11):
    progress(step)
    with progress.timed('eval'):
      time.sleep(0.001)
    writer.write_scalars(step, {'train/loss': 1.0 / step})
  writer.write_hparams({'lr': 0.1})
  writer.flush()
  writer.close()
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  logging_only = metrics_io._FallbackWriter(str(tmp_path / 'x'), just_logging=True)  # noqa: SLF001
  logging_only.write_scalars(1, {'a': 2.0})
  logging_only.close()
