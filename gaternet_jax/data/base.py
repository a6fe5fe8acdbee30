"""What every data source returns, and the helpers they share.

Nothing here imports TensorFlow: the in-memory sources (the embedded default, ImageFolder) must
work on a machine that has only numpy and Pillow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator, Sequence

import numpy as np

from gaternet_jax import errors

# Name of the split carved out of the training set by `data.holdout`.
HOLDOUT = 'holdout'
TRAIN = 'train'

# Channel statistics are computed from at most this many training images (a fixed seeded sample):
# plenty for four significant digits, and cheap to decode again on a process that does not own
# them.
_STATS_SAMPLE = 10_000
_STATS_SEED = 0


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a loaded dataset; identical on every process.

  Attributes:
    name: the configured source name (`data.name`).
    num_classes: number of labels; labels are ints in [0, num_classes).
    image_shape: (H, W, C) of the images the model sees.
    mean: per-channel mean, 0-255 scale, for normalization on device.
    std: per-channel standard deviation, 0-255 scale.
    num_train: global number of training examples, after the hold-out was removed.
    split_sizes: global size of every split usable for evaluation (e.g. 'test', 'holdout');
      'train' is not listed but can be evaluated too (its size is `num_train`).
    in_memory: True when the whole dataset is held as uint8 numpy arrays (`train_arrays`,
      `eval_arrays`); False when it is streamed through tf.data (`train_iterator`).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_train: int
  split_sizes: dict[str, int]
  in_memory: bool
  class_names: tuple[str, ...] | None = None  # label id -> name, where the source knows them

  def split_size(self, split: str, flag: str = '--config.data.eval_split') -> int:
    """Global size of `split` ('train' included); UserError for an unknown split, naming the
    `flag` that chose it (a command's own `--split`, or the config's evaluation split)."""
    if split == TRAIN:
      return self.num_train
    if split not in self.split_sizes:
      known = ', '.join([TRAIN, *sorted(self.split_sizes)])
      raise errors.UserError(
        f"dataset '{self.name}' has no split '{split}'; its splits are: {known} "
        f'(set {flag} to one of them)'
      )
    return self.split_sizes[split]


class Dataset:
  """A loaded dataset: `info` plus this process's share of the examples.

  In-memory datasets implement `train_arrays` and `eval_arrays`; streamed ones implement
  `train_iterator`. Both kinds implement `eval_iterator`.
  """

  info: DatasetInfo

  def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """This process's training images, uint8 (n, H, W, C), and labels, int32 (n,)."""
    raise TypeError(
      f"dataset '{self.info.name}' is streamed (info.in_memory is False): use train_iterator"
    )

  def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """This process's part of an evaluation split, as in `train_arrays`."""
    raise TypeError(
      f"dataset '{self.info.name}' is streamed (info.in_memory is False): use eval_iterator"
    )

  def train_iterator(
    self, local_batch_size: int, *, seed: int, start_step: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of augmented training batches {'image', 'label'} (streamed only)."""
    raise TypeError(
      f"dataset '{self.info.name}' is in memory (info.in_memory is True): use train_arrays "
      'and augment on device'
    )

  def eval_iterator(self, split: str, local_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of `split` as padded batches {'image', 'label', 'mask'}.

    Every process yields the same number of batches, so multi-host evaluation stays in lock step.
    """
    raise NotImplementedError


class InMemoryDataset(Dataset):
  """A dataset whose (per-process) examples are uint8 numpy arrays."""

  def __init__(
    self,
    info: DatasetInfo,
    train: tuple[np.ndarray, np.ndarray],
    evals: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    process_count: int,
  ):
    """Wraps arrays already sliced for this process.

    Args:
      info: the dataset's global facts.
      train: this process's training images and labels.
      evals: this process's part of every split in `info.split_sizes`.
      process_count: number of processes the examples were dealt to; fixes the batch count of
        `eval_iterator`.
    """
    self.info = info
    self._train = train
    self._evals = evals
    self._process_count = process_count

  def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    return self._train

  def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    self.info.split_size(split)  # UserError for an unknown split.
    return self._train if split == TRAIN else self._evals[split]

  def eval_iterator(self, split: str, local_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    images, labels = self.eval_arrays(split)
    num_batches = lockstep_num_batches(
      self.info.split_size(split), self._process_count, local_batch_size
    )
    return eval_batches(images, labels, local_batch_size, num_batches)


def lockstep_num_batches(global_size: int, process_count: int, local_batch_size: int) -> int:
  """Batches every process yields for a split dealt round-robin (or evenly) to the processes.

  Both ways of dealing give the largest share ceil(global_size / process_count) examples, and
  every process must yield as many batches as the process holding that share.
  """
  check_batch_size(local_batch_size)
  largest_share = -(-global_size // process_count)
  return max(1, -(-largest_share // local_batch_size))


def eval_batches(
  images: np.ndarray,
  labels: np.ndarray,
  local_batch_size: int,
  num_batches: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Cuts arrays into batches of exactly `local_batch_size`, padding with masked rows.

  Args:
    images: uint8 (n, H, W, C).
    labels: integer (n,).
    local_batch_size: rows per batch.
    num_batches: batches to yield; all-masked batches are appended to reach it (lets every
      process of a multi-host evaluation yield the same count). Default: ceil(n / batch), at
      least 1.

  Yields:
    {'image': uint8 (B, H, W, C), 'label': int32 (B,), 'mask': float32 (B,)}, the examples in
    order, each exactly once with mask 1; padded rows are zeros with mask 0.

  Raises:
    ValueError: `num_batches` is too small to hold every example.
  """
  check_batch_size(local_batch_size)
  n = len(images)
  if len(labels) != n:
    raise ValueError(f'{n} images but {len(labels)} labels')
  needed = max(1, math.ceil(n / local_batch_size))
  if num_batches is None:
    num_batches = needed
  elif num_batches < needed:
    raise ValueError(
      f'num_batches={num_batches} cannot hold {n} examples in batches of {local_batch_size}'
    )

  def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, n, local_batch_size):
      yield images[start : start + local_batch_size], labels[start : start + local_batch_size]

  return pad_batches(chunks(), local_batch_size, num_batches, images.shape[1:])


def pad_batches(
  chunks: Iterable[tuple[np.ndarray, np.ndarray]],
  local_batch_size: int,
  num_batches: int,
  image_shape: Sequence[int],
) -> Iterator[dict[str, np.ndarray]]:
  """Pads (images, labels) chunks into exactly `num_batches` full batches with a mask.

  The shared tail of `eval_batches` and the streamed eval pipeline: each chunk holds at most
  `local_batch_size` rows; all-masked batches follow the last chunk up to `num_batches`.
  """
  image_shape = tuple(image_shape)
  emitted = 0
  for images, labels in chunks:
    if emitted == num_batches:
      raise ValueError(f'more than {num_batches} batches of {local_batch_size} examples')
    yield _padded(images, labels, local_batch_size, image_shape)
    emitted += 1
  if emitted < num_batches:
    # One all-masked batch, shared: consumers only read it.
    empty = _padded(
      np.zeros((0, *image_shape), np.uint8),
      np.zeros((0,), np.int32),
      local_batch_size,
      image_shape,
    )
    for _ in range(num_batches - emitted):
      yield empty


def _padded(
  images: np.ndarray, labels: np.ndarray, batch: int, image_shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
  n = len(images)
  mask = np.zeros((batch,), np.float32)
  mask[:n] = 1.0
  if n == batch:
    return {'image': images, 'label': labels.astype(np.int32, copy=False), 'mask': mask}
  padded_images = np.zeros((batch, *image_shape), np.uint8)
  padded_images[:n] = images
  padded_labels = np.zeros((batch,), np.int32)
  padded_labels[:n] = labels
  return {'image': padded_images, 'label': padded_labels, 'mask': mask}


def check_batch_size(local_batch_size: int) -> None:
  """UserError unless the per-process batch size is positive."""
  if local_batch_size < 1:
    raise errors.UserError(f'the per-process batch size must be at least 1, got {local_batch_size}')


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
  """Which examples one process of a run holds: the global hold-out, then this process's share.

  Built once by `load_dataset` and handed to every source.

  Attributes:
    holdout: training examples moved to the split 'holdout' (0: none). They are chosen on the
      GLOBAL training set, before anything is shared out, so every process agrees on them.
    holdout_seed: seed of the hold-out permutation (`holdout_indices`).
    process_index: this process (`jax.process_index()`), in [0, process_count).
    process_count: number of processes (`jax.process_count()`); process p holds examples
      [p::process_count] of every evaluation split (`process_share`).
    devices_per_process: devices of each process (`jax.local_device_count()`); decides which
      training examples a process holds (`train_share`).
  """

  holdout: int = 0
  holdout_seed: int = 0
  process_index: int = 0
  process_count: int = 1
  devices_per_process: int = 1

  def __post_init__(self):
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} is not in [0, {self.process_count})')

  def holdout_indices(self, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits range(num_examples) into (train, holdout) index arrays, each sorted.

    The split is a seeded permutation of the GLOBAL training set, so every process computes the
    same one before taking its own share.
    """
    if self.holdout < 0 or self.holdout >= num_examples:
      raise errors.UserError(
        f'data.holdout must be in [0, {num_examples}) for a training set of {num_examples} '
        f'examples, got {self.holdout}'
      )
    permutation = np.random.default_rng(self.holdout_seed).permutation(num_examples)
    return np.sort(permutation[self.holdout :]), np.sort(permutation[: self.holdout])

  def process_share(self, num_examples: int) -> np.ndarray:
    """Indices of the examples this process owns: [process_index::process_count]."""
    return np.arange(self.process_index, num_examples, self.process_count)

  def train_share(self, num_examples: int) -> np.ndarray:
    """Indices of the training examples this process owns, ascending: those its devices train on.

    With D = process_count * devices_per_process devices in all, the device at mesh position d
    holds the examples i with i % D == d (`feed.ResidentTrainData`); process p owns mesh
    positions p * devices_per_process + j, so it owns the i with (i % D) // devices_per_process
    == p. Each device's examples then depend only on its position in the mesh, so 2 processes x
    2 devices train on exactly the batches of 1 process x 4 devices. With one device per process
    this is `process_share`.
    """
    devices = self.process_count * self.devices_per_process
    owner = (np.arange(num_examples) % devices) // self.devices_per_process
    return np.flatnonzero(owner == self.process_index)


def stats_sample(num_train: int) -> np.ndarray:
  """Sorted indices of the training examples the channel statistics are computed from.

  A fixed function of the training-set size, so every process (and every process count) gets
  the same statistics.
  """
  if num_train <= _STATS_SAMPLE:
    return np.arange(num_train)
  rng = np.random.default_rng(_STATS_SEED)
  return np.sort(rng.choice(num_train, _STATS_SAMPLE, replace=False))


MIN_STD = 1.0


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation (0-255 scale) of uint8 images (n, H, W, C)."""
  channels = images.shape[-1]
  flat = images.reshape(-1, channels)
  count = flat.shape[0]
  # float64 sums: exact for uint8 data at any realistic size; no float copy of the images.
  total = flat.sum(axis=0, dtype=np.float64)
  total_sq = np.einsum('nc,nc->c', flat, flat, dtype=np.float64)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  # A constant channel (e.g. an empty colour channel) would divide by zero when normalising; one
  # grey level is the smallest meaningful spread of uint8 data.
  std = np.maximum(std, MIN_STD)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def validate_eval_split(info: DatasetInfo, eval_split: str) -> None:
  """Fails at load time (not at the first evaluation) when the configured split is missing."""
  if eval_split == HOLDOUT and HOLDOUT not in info.split_sizes:
    raise errors.UserError(
      "data.eval_split is 'holdout' but data.holdout is 0; set --config.data.holdout to the "
      'number of training examples to hold out (the paper uses 5000)'
    )
  info.split_size(eval_split)


def from_global_arrays(
  name: str,
  part: ProcessSlice,
  *,
  num_classes: int,
  train: tuple[np.ndarray, np.ndarray],
  evals: dict[str, tuple[np.ndarray, np.ndarray]],
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  class_names: Sequence[str] | None = None,
) -> InMemoryDataset:
  """Builds an in-memory dataset from whole splits that every process holds.

  Applies the global hold-out, computes channel statistics when none are given (from the
  training set after the hold-out), then keeps this process's share of every split.

  Args:
    name: the source name for `DatasetInfo.name`.
    part: the hold-out and this process's share.
    num_classes: number of labels.
    train: the whole training split, images uint8 (n, H, W, C) and integer labels.
    evals: the whole evaluation splits by name.
    mean: per-channel mean (0-255) to report instead of computing it.
    std: per-channel std (0-255) to report instead of computing it.
    class_names: label id -> name, where the source knows them.

  Returns:
    The dataset, holding only this process's examples.
  """
  train_images, train_labels = train
  evals = dict(evals)
  if part.holdout:
    if HOLDOUT in evals:
      raise errors.UserError(
        f"dataset '{name}' already has a split named 'holdout'; set --config.data.holdout=0"
      )
    keep, held = part.holdout_indices(len(train_images))
    evals[HOLDOUT] = (train_images[held], train_labels[held])
    train_images, train_labels = train_images[keep], train_labels[keep]
  if mean is None or std is None:
    mean, std = channel_stats(train_images[stats_sample(len(train_images))])
  info = DatasetInfo(
    name=name,
    num_classes=num_classes,
    image_shape=tuple(int(d) for d in train_images.shape[1:]),
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
    num_train=len(train_images),
    split_sizes={split: len(arrays[0]) for split, arrays in evals.items()},
    in_memory=True,
    class_names=tuple(class_names) if class_names else None,
  )

  def share(arrays: tuple[np.ndarray, np.ndarray], idx: np.ndarray):
    return arrays[0][idx], arrays[1][idx].astype(np.int32)

  return InMemoryDataset(
    info,
    share((train_images, train_labels), part.train_share(len(train_images))),
    {split: share(arrays, part.process_share(len(arrays[0]))) for split, arrays in evals.items()},
    process_count=part.process_count,
  )
