"""Datasets read through tensorflow_datasets: CIFAR in memory, ImageNet streamed through tf.data.

TensorFlow and tensorflow_datasets are imported inside the functions that need them, never at
module import, so the rest of the package (and the models, and training on the in-memory
sources) works without them. TensorFlow is hidden from every GPU: JAX owns the accelerators.

Nothing is downloaded: the data must already be prepared in the tfds data_dir.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
from absl import logging

from gaternet_jax import errors
from gaternet_jax.data import base

# Channel statistics of the training sets (0-255 scale), the usual published values; computed
# over all pixels (not averaged per image, which gives the often-copied 0.2023 stds).
CIFAR_STATS = {
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STREAMED = ('imagenet2012',)

# Inception-style random-resized-crop: 8%-100% of the image, aspect 3/4-4/3. The sampler's
# `min_object_covered` must be 0 (as big_vision passes): against the whole-image box it is a
# lower bound on the crop's area too, and the 0.1 of the Flax example made the smallest crop 10%
# of the image, not 8% (measured: minimum area 0.100 over 3,000 samples; with 0, 0.080).
_CROP_AREA = (0.08, 1.0)
_CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
_CROP_MIN_COVERED = 0.0
_CROP_ATTEMPTS = 10
# Evaluation: shorter side resized to image_size / 0.875, then a centre crop of image_size.
_EVAL_CROP_FRACTION = 0.875


def import_tf() -> tuple[Any, Any]:
  """Imports (tensorflow, tensorflow_datasets), hiding every GPU from TensorFlow."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(
      f'the tfds datasets (cifar10, cifar100, imagenet2012) need tensorflow and '
      f'tensorflow-datasets, which cannot be imported here ({e}); install them, or use '
      "data.name='default' or 'imagefolder'"
    ) from e
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # TensorFlow's devices were already initialized (by another import in this process); the
    # visible set can no longer change. Say so when that left it an accelerator: it may hold
    # that GPU's memory, which JAX then cannot have.
    held = tf.config.get_visible_devices('GPU')
    if held:
      logging.warning(
        'TensorFlow was initialised before gaternet_jax could hide the GPUs from it and holds '
        '%d; it may take memory JAX needs. Import TensorFlow after gaternet_jax, or call '
        "tf.config.set_visible_devices([], 'GPU') first.",
        len(held),
      )
  return tf, tfds


def _builder(name: str, data_dir: str | None):
  """The tfds builder of `name`, with a one-line DatasetNotFoundError when it is not prepared."""
  _, tfds = import_tf()
  if data_dir:
    data_dir = os.path.expanduser(data_dir)
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    # Building (not reading) the train pipeline is the cheapest check that works both on real
    # prepared data and under `tfds.testing.mock_data` (where `is_prepared()` is False).
    builder.as_dataset(split=base.TRAIN, decoders=_skip_image_decoding(tfds))
  except (AssertionError, FileNotFoundError, tfds.core.DatasetNotFoundError) as e:
    where = data_dir or os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
    raise errors.DatasetNotFoundError(
      f"dataset '{name}' was not found in {where}; this machine cannot download it: run "
      f'`tfds build {name}` where there is network and copy the folder, or set '
      '--config.data.data_dir'
    ) from e
  return builder


def _skip_image_decoding(tfds) -> dict[str, Any]:
  return {'image': tfds.decode.SkipDecoding()}


def _split_size(builder, split: str) -> int:
  """Global number of examples of `split`.

  The dataset's metadata is authoritative; under `tfds.testing.mock_data` it has no split sizes,
  and the mocked pipeline's cardinality stands in.
  """
  try:
    return int(builder.info.splits[split].num_examples)
  except KeyError:
    pass
  _, tfds = import_tf()
  ds = builder.as_dataset(split=split, decoders=_skip_image_decoding(tfds))
  cardinality = int(ds.cardinality())
  if cardinality < 0:
    raise errors.UserError(
      f"dataset '{builder.name}' does not record the size of split '{split}'; rebuild it "
      f'with `tfds build {builder.name}`'
    )
  return cardinality


def load_cifar(name: str, data_dir: str | None, part: base.ProcessSlice) -> base.InMemoryDataset:
  """CIFAR-10/100 from tfds, whole splits decoded to uint8 in memory, then shared out."""
  builder = _builder(name, data_dir)
  splits = {split: _read_whole_split(builder, split) for split in (base.TRAIN, 'test')}
  mean, std = CIFAR_STATS[name]
  return base.from_global_arrays(
    name,
    part,
    num_classes=builder.info.features['label'].num_classes,
    train=splits[base.TRAIN],
    evals={'test': splits['test']},
    mean=[m * 255.0 for m in mean],
    std=[s * 255.0 for s in std],
    class_names=builder.info.features['label'].names,
  )


def _read_whole_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (uint8 images, int32 labels), in the dataset's stored order."""
  tf, tfds = import_tf()
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(
    lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)), num_parallel_calls=tf.data.AUTOTUNE
  )
  # Chunks rather than `batch_size=-1`: one 50k-image tensor buys nothing, and the -1 path
  # crashes under `tfds.testing.mock_data`.
  chunks = list(tfds.as_numpy(ds.batch(8192).prefetch(1)))
  if not chunks:
    raise errors.DatasetNotFoundError(f"split '{split}' of dataset '{builder.name}' is empty")
  return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


class StreamedDataset(base.Dataset):
  """An image-classification tfds dataset streamed through tf.data (ImageNet)."""

  def __init__(
    self,
    builder,
    *,
    image_size: int,
    shuffle_buffer: int,
    process_index: int,
    process_count: int,
    eval_splits: tuple[str, ...],
    private_threads: int | None = None,
  ):
    self._builder = builder
    self._options = _pipeline_options(private_threads)
    self._image_size = image_size
    self._shuffle_buffer = shuffle_buffer
    self._process_index = process_index
    self._process_count = process_count
    self.info = base.DatasetInfo(
      name=builder.name,
      num_classes=builder.info.features['label'].num_classes,
      image_shape=(image_size, image_size, 3),
      mean=tuple(m * 255.0 for m in IMAGENET_MEAN),
      std=tuple(s * 255.0 for s in IMAGENET_STD),
      num_train=_split_size(builder, base.TRAIN),
      split_sizes={split: _split_size(builder, split) for split in eval_splits},
      in_memory=False,
    )

  def _local(self, split: str):
    """(tfds split of this process, its number of examples), without reading any data.

    `tfds.split_for_jax_process` deals a split evenly, the first `size % count` processes
    getting one extra example; the count is computed the same way here.
    """
    _, tfds = import_tf()
    size = self.info.split_size(split)
    count = size // self._process_count + (self._process_index < size % self._process_count)
    local_split = tfds.split_for_jax_process(
      split, process_index=self._process_index, process_count=self._process_count
    )
    return local_split, count

  def _records(self, split: str):
    """This process's part of `split`: (encoded JPEG, int32 label) records, stored order."""
    tf, tfds = import_tf()
    local_split, count = self._local(split)
    ds = self._builder.as_dataset(
      split=local_split, shuffle_files=False, decoders=_skip_image_decoding(tfds)
    )
    # `take` is a no-op on real data; under mock_data every split yields the mock count.
    ds = ds.take(count)
    ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))
    return ds, count

  def train_iterator(
    self, local_batch_size: int, *, seed: int, start_step: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless, deterministic, augmented training batches of this process's part of 'train'.

    The stream is epoch after epoch of this process's examples; epoch `e` is shuffled (through
    a `shuffle_buffer` window over the stored order, which tfds already shuffled when it wrote
    the files) with a seed derived from (seed, process, e). Batches run across epoch ends.
    Example `i` of the stream is augmented with a seed derived from (seed, process, i), so
    resuming at `start_step` reproduces the uninterrupted run exactly; the consumed examples
    are skipped as encoded records, before any decoding.

    Args:
      local_batch_size: examples per batch on this process.
      seed: the run's data seed.
      start_step: batches already consumed (0 for a fresh run).

    Yields:
      {'image': uint8 (B, image_size, image_size, 3), 'label': int32 (B,)}.
    """
    base.check_batch_size(local_batch_size)
    tf, tfds = import_tf()
    records, count = self._records(base.TRAIN)
    if count < 1:
      raise errors.UserError(f'process {self._process_index} has no training examples')
    first = start_step * local_batch_size
    first_epoch, offset = divmod(first, count)
    base_seed = tf.constant([seed, self._process_index], tf.int64)
    shuffle_base = tf.random.experimental.stateless_fold_in(base_seed, 0)
    augment_base = tf.random.experimental.stateless_fold_in(base_seed, 1)
    buffer = min(self._shuffle_buffer, count)

    def epoch(e):
      if buffer <= 1:
        return records
      epoch_seed = tf.random.stateless_uniform(
        [],
        seed=tf.random.experimental.stateless_fold_in(shuffle_base, e),
        minval=0,
        maxval=2**62,
        dtype=tf.int64,
      )
      return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

    image_size = self._image_size

    def augment(index, record):
      image_bytes, label = record
      crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(augment_base, index), num=2
        )
      )
      image = _random_resized_crop(tf, image_bytes, image_size, crop_seed)
      flip = tf.random.stateless_uniform([], seed=flip_seed) < 0.5
      image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
      return {'image': image, 'label': label}

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
    ds = ds.skip(offset).enumerate(start=first)
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.with_options(self._options)))

  def eval_iterator(self, split: str, local_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    tf, tfds = import_tf()
    records, _ = self._records(split)
    image_size = self._image_size
    ds = records.map(
      lambda image_bytes, label: (_center_crop(tf, image_bytes, image_size), label),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(local_batch_size).prefetch(tf.data.AUTOTUNE)
    num_batches = base.lockstep_num_batches(
      self.info.split_size(split), self._process_count, local_batch_size
    )
    return base.pad_batches(
      tfds.as_numpy(ds.with_options(self._options)),
      local_batch_size,
      num_batches,
      self.info.image_shape,
    )


def load_streamed(
  name: str,
  data_dir: str | None,
  part: base.ProcessSlice,
  *,
  image_size: int,
  shuffle_buffer: int,
) -> StreamedDataset:
  """ImageNet (ILSVRC-2012) from tfds, streamed; evaluation split 'validation'.

  Each process streams its `tfds.split_for_jax_process` part of every split; `part` may not hold
  any examples out.
  """
  if part.holdout:
    raise errors.UserError(
      f"data.holdout is not supported for the streamed dataset '{name}'; set "
      "--config.data.holdout=0 and evaluate on data.eval_split='validation'"
    )
  if image_size < 1:
    raise errors.UserError(f'data.image_size must be positive, got {image_size}')
  return StreamedDataset(
    _builder(name, data_dir),
    image_size=image_size,
    shuffle_buffer=shuffle_buffer,
    process_index=part.process_index,
    process_count=part.process_count,
    eval_splits=('validation',),
  )


def _pipeline_options(private_threads: int | None = None):
  """tf.data options of the streamed pipelines.

  Deterministic: same seed, same batches (parallel map and interleave keep their input order).
  Threads: as flax's ImageNet example and big_vision, a private pool for the pipeline's decoding
  and cropping (`private_threads`; None: one per core of the host, 0: TensorFlow's shared pool)
  and no parallelism inside one element's ops, so the pipeline's work does not queue behind or
  oversubscribe the threads of TensorFlow's own pool (benchmarks/host_pipeline.py measures it).
  """
  tf, _ = import_tf()
  options = tf.data.Options()
  options.deterministic = True
  threads = (os.cpu_count() or 1) if private_threads is None else private_threads
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _to_uint8(tf, image):
  """Resized float pixels back to uint8 (bicubic overshoots [0, 255])."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _resize(tf, image, image_size: int):
  resized = tf.image.resize(image, [image_size, image_size], method='bicubic')
  return _to_uint8(tf, resized)


def _center_crop(tf, image_bytes, image_size: int):
  """Eval view: the centre square of side 0.875 * shorter side, resized to image_size.

  The same pixels as resizing the shorter side to image_size / 0.875 and cropping the centre
  image_size square, with one resampling instead of two, and only the crop decoded.
  """
  shape = tf.io.extract_jpeg_shape(image_bytes)
  height, width = shape[0], shape[1]
  side = tf.cast(
    tf.round(_EVAL_CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32
  )
  side = tf.maximum(side, 1)
  window = tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])
  image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
  return _resize(tf, image, image_size)


def _random_resized_crop(tf, image_bytes, image_size: int, seed):
  """Inception-style crop: random area 8%-100%, aspect 3/4-4/3, decoded, resized to image_size.

  Falls back to the eval centre crop when no valid window is found in `_CROP_ATTEMPTS` tries.
  """
  shape = tf.io.extract_jpeg_shape(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4]),
    seed=seed,
    min_object_covered=_CROP_MIN_COVERED,
    aspect_ratio_range=_CROP_ASPECT,
    area_range=_CROP_AREA,
    max_attempts=_CROP_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  offset_y, offset_x, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(size)
  # The sampler returns the whole image when every attempt failed.
  failed = tf.logical_and(tf.equal(height, shape[0]), tf.equal(width, shape[1]))

  def crop():
    window = tf.stack([offset_y, offset_x, height, width])
    return _resize(tf, tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3), image_size)

  return tf.cond(failed, lambda: _center_crop(tf, image_bytes, image_size), crop)
