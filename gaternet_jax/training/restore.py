"""Loading a trained run: which directory a workdir stands for, its config, its latest checkpoint.

`load_run(workdir)` is the notebook API:

    import gaternet_jax
    run = gaternet_jax.load_run('runs/default')       # a plain run, a procedure workdir, a stage
    logits, gates = run.predict(images)                # uint8 (n, h, w, c) -> NumPy arrays

`load_state` is what the commands use (it also builds the mesh, optimizer and dataset).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gaternet_jax import cpu, layout, models
from gaternet_jax import data as data_lib
from gaternet_jax.data import augment
from gaternet_jax.errors import CheckpointError, UserError
from gaternet_jax.training import checkpoints, distributed, steps
from gaternet_jax.training import workdir as workdir_lib


def run_dir(workdir: str) -> str:
  """The run a workdir stands for: itself, or the joint stage of a procedure workdir."""
  if workdir_lib.exists(workdir, workdir_lib.CHECKPOINT_DIR):
    return workdir
  joint = workdir_lib.join(workdir, workdir_lib.STAGE_JOINT)
  if workdir_lib.exists(joint):
    return joint
  return workdir


def pretrained_dir(path: str, stage: str) -> str:
  """A run given by `init.*`: a plain run's workdir, or a procedure workdir holding `stage`."""
  if workdir_lib.exists(path, stage):
    return workdir_lib.join(path, stage)
  return path


def require_checkpoint(workdir: str | os.PathLike) -> str:
  """The run directory of `workdir` (a string or any path-like, e.g. pathlib or epath), or one
  clear UserError if it holds no trained run."""
  if isinstance(workdir, os.PathLike):
    workdir = os.fspath(workdir)
  if not isinstance(workdir, str):
    raise UserError(f'a workdir is a path, got {type(workdir).__name__}')
  if not workdir or not workdir.strip():
    raise UserError('--workdir must not be empty')
  root = workdir_lib.path(workdir)
  if not root.exists():
    raise UserError(f'workdir {workdir!r} does not exist')
  if not root.is_dir():
    raise UserError(f'workdir {workdir!r} is a file, not a run directory')
  directory = run_dir(workdir)
  if distributed.agree(lambda: checkpoints.latest_step(directory)) is None:
    raise CheckpointError(f'no checkpoint in {workdir!r}: train there first')
  return directory


class Loaded(NamedTuple):
  """A restored run: its config, the built setup, the state at `step`, and its dataset."""

  config: Any
  setup: steps.Setup
  state: steps.TrainState
  dataset: Any  # None when the caller passed `info`
  step: int


def load_state(
  workdir: str, *, step: int | None = None, info=None, mesh=None, verify: bool = True
) -> Loaded:
  """Restores checkpoint `step` (default: the latest) of a run with the config stored beside it.

  Args:
    workdir: a run directory, or a procedure workdir (its joint stage is loaded).
    step: which checkpoint; None for the latest.
    info: the dataset's `DatasetInfo`; when None the dataset is loaded (and returned).
    mesh: the device mesh (default: every device).
    verify: check the checkpoint's arrays against the checksum written with it.
  """
  directory = run_dir(workdir)
  config = workdir_lib.load_config(directory)
  requested = step
  available = distributed.agree(lambda: checkpoints.latest_step(directory))
  if available is None:
    raise CheckpointError(f'no checkpoint in {directory!r}: train there first')
  if step is None:
    step = available
  elif not distributed.agree(lambda: step in checkpoints.steps(directory)):
    raise CheckpointError(
      f'no checkpoint {step} in {directory!r}; it has {checkpoints.steps(directory)}'
    )
  dataset = None
  if info is None:
    dataset = data_lib.load_dataset(
      config.data,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      devices_per_process=jax.local_device_count(),
    )
    info = dataset.info
  setup = steps.build(config, info, mesh=mesh)
  while True:
    manager = checkpoints.make_manager(directory, keep=config.keep_checkpoints, create=False)
    try:
      state = checkpoints.restore(manager, step, setup.abstract_state, directory, verify=verify)
      break
    except CheckpointError:
      # A run training in this directory removes its oldest checkpoint after each save, so the
      # one listed may be gone by the time it is read. Gone is not damaged: take the newest
      # that exists now (or say so, when that one was asked for); still listed, it is damaged.
      listed = distributed.agree_json(lambda: checkpoints.steps(directory))
      if step in listed:
        raise
      if requested is not None:
        raise CheckpointError(
          f'checkpoint {step} in {directory!r} was removed while it was read: a run training '
          f'there keeps only its latest {config.keep_checkpoints}; it has {listed} now'
        ) from None
      if not listed or listed[-1] <= step:
        raise
      step = listed[-1]
    finally:
      manager.close()
  return Loaded(config, setup, state, dataset, step)


@dataclasses.dataclass
class Run:
  """A trained run, ready for analysis in a notebook (evaluation mode only).

  Attributes:
    workdir: the run directory that was loaded (a procedure workdir's joint stage).
    config: the config it was trained with.
    model: the Flax module.
    variables: {'params': ..., 'batch_stats': ...}.
    step: the checkpoint's step.
    image_shape: (h, w, c) of the images `predict` takes.
    info: the dataset's facts (classes, normalisation statistics, class names).
  """

  workdir: str
  config: Any
  model: Any
  variables: dict[str, Any]
  step: int
  image_shape: tuple[int, int, int]
  info: Any
  batch_size: int = 256

  def __post_init__(self):
    info = self.info

    def forward(variables, images):
      x = augment.normalize(images, info.mean, info.std, steps.compute_dtype(self.config))
      with cpu.speedups(jax.default_backend(), training=False):
        logits, aux = self.model.apply(variables, x, train=False)
      gates = aux['gates'] > 0.5 if 'gates' in aux else jnp.zeros((images.shape[0], 0), bool)
      return logits, gates

    self._forward = jax.jit(forward)

  @property
  def gated(self) -> bool:
    return bool(self.config.model.gated)

  @property
  def num_gates(self) -> int:
    """c, the length of the gate vector (0 for a plain model)."""
    if not self.gated:
      return 0
    return layout.total_filters(models.gate_layout(self.config, self.image_shape))

  def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Evaluation-mode logits (n, classes) and binary gates (n, c) of uint8 images (n, h, w, c).

    Runs in fixed-size batches (the last one padded), so any n compiles once and a 10,000-image
    array fits a CPU's memory. Gates are None for a plain model.
    """
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
      raise UserError(
        f'predict takes uint8 images of shape (n, {", ".join(map(str, self.image_shape))}), '
        f'got {images.shape}'
      )
    if images.dtype != np.uint8:
      # Anything else has no one reading: floats in [0, 1] or [0, 255], wider ints that wrap.
      raise UserError(
        f'predict takes uint8 images (pixels 0-255, as the training data), got {images.dtype}; '
        "convert explicitly, e.g. np.clip(np.round(x * 255), 0, 255).astype('uint8') for "
        'floats in [0, 1]'
      )
    batch = self.batch_size
    logits, gates = [], []
    for start in range(0, len(images), batch):
      chunk = images[start : start + batch]
      padded = np.zeros((batch, *self.image_shape), np.uint8)
      padded[: len(chunk)] = chunk
      out_logits, out_gates = jax.device_get(self._forward(self.variables, padded))
      logits.append(np.asarray(out_logits[: len(chunk)], np.float32))
      gates.append(np.asarray(out_gates[: len(chunk)]))
    if not logits:  # no images: empty arrays of the right widths
      logits.append(np.zeros((0, self.info.num_classes), np.float32))
      gates.append(np.zeros((0, self.num_gates), bool))
    return np.concatenate(logits), (np.concatenate(gates) if self.gated else None)


def load_run(
  workdir: str | os.PathLike,
  step: int | None = None,
  *,
  skip_off_units: bool = False,
  batch_size: int | None = None,
) -> Run:
  """Loads a trained run for analysis: a plain run, a procedure workdir (its joint stage) or any
  stage folder; `step` picks a checkpoint (default: the latest). `skip_off_units`: the model
  skips every unit whose gates are all off for the whole batch (`models.with_unit_skipping`:
  the same outputs, faster where images leave units off, above all one image at a time).
  `batch_size`: the batch `predict` runs in (default: the config's evaluation batch, at most 256).

  Raises:
    UserError: the workdir does not exist or holds no checkpoint (one clear line).
  """
  if batch_size is not None and batch_size < 1:
    raise UserError(f'batch_size must be at least 1, got {batch_size}')
  directory = require_checkpoint(workdir)
  loaded = load_state(directory, step=step)
  state = loaded.state
  info = loaded.setup.info
  model = loaded.setup.model
  if skip_off_units:
    model = models.with_unit_skipping(model)
  return Run(
    workdir=directory,
    config=loaded.config,
    model=model,
    variables={'params': state.params, 'batch_stats': state.batch_stats},
    step=loaded.step,
    image_shape=tuple(info.image_shape),
    info=info,
    batch_size=batch_size or max(1, min(256, int(loaded.config.eval_batch_size))),
  )
