"""ImageFolder: a directory of image files, decoded with Pillow into memory.

Layout: `<root>/<split>/<class>/*.jpg|*.jpeg|*.png`. `<root>/train` is the training split; every
other subfolder of `<root>` is an evaluation split named after it (e.g. `test`, `validation`). The
class folders of `train`, sorted by name, are the label ids; an evaluation split may lack some of
them but may not add new ones. Every image must have the same size. RGB unless the first training
image is single-channel, in which case the whole dataset is read as grayscale.

No TensorFlow here: this path must work with numpy and Pillow alone.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import numpy as np

from gaternet_jax import errors
from gaternet_jax.data import base

NAME = 'imagefolder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_LAYOUT = '<root>/<split>/<class>/*.jpg|*.jpeg|*.png'
# Pillow modes read as one channel; everything else (RGB, RGBA, P, CMYK, ...) becomes RGB.
_GRAY_MODES = ('1', 'L', 'LA')
# More than 8 bits per pixel (16-bit PNGs, 32-bit integer or float images): Pillow's conversion
# to 8 bits clips them rather than scaling, so they are refused instead of silently converted.
_WIDE_MODES = ('I', 'F')
# Files per task handed to a decoding thread: big enough that scheduling costs nothing.
_CHUNK = 256


def load(root: str | None, part: base.ProcessSlice) -> base.InMemoryDataset:
  """Lists, holds out, shares out and decodes an image folder.

  Files are listed and the hold-out is chosen on the global file list, so every process agrees;
  each process then decodes only its own files (`part.train_share`, `part.process_share`).

  Args:
    root: the folder holding `train/` and any evaluation split folders.
    part: the hold-out and this process's share.

  Returns:
    The in-memory dataset holding this process's images.

  Raises:
    DatasetNotFoundError: the root, its `train` folder, or any image in it is missing.
    UserError: images of different sizes, an undecodable file, or an inconsistent layout.
  """
  if not root:
    raise errors.UserError(
      f"data.name='imagefolder' needs --config.data.data_dir set to a folder laid out as {_LAYOUT}"
    )
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise errors.DatasetNotFoundError(
      f'image folder root {root} does not exist; set --config.data.data_dir to a folder laid '
      f'out as {_LAYOUT}'
    )
  train_dir = os.path.join(root, base.TRAIN)
  if not os.path.isdir(train_dir):
    raise errors.DatasetNotFoundError(
      f'training split folder {train_dir} does not exist; an image folder is laid out as '
      f'{_LAYOUT} and needs a train split'
    )
  classes = _subfolders(train_dir)
  if len(classes) == 1:
    raise errors.UserError(
      f'{train_dir} has one class folder ({classes[0]}); a classifier needs at least two '
      f'(layout {_LAYOUT})'
    )
  train_files, train_labels = _list_split(train_dir, classes)
  if not train_files:
    raise errors.DatasetNotFoundError(
      f'no {"/".join(IMAGE_EXTENSIONS)} images found under {train_dir}/<class>/ (layout {_LAYOUT})'
    )
  empty = [c for label, c in enumerate(classes) if not np.any(train_labels == label)]
  if empty:
    # It would silently be one more output of the classifier that no example ever has.
    raise errors.UserError(
      f'class folder {os.path.join(train_dir, empty[0])} has no {"/".join(IMAGE_EXTENSIONS)} '
      f'images ({len(empty)} such folder(s)); remove it or add its images'
    )

  eval_files = {}
  for split in _subfolders(root):
    if split == base.TRAIN:
      continue
    split_dir = os.path.join(root, split)
    unknown = sorted(set(_subfolders(split_dir)) - set(classes))
    if unknown:
      raise errors.UserError(
        f'split folder {split_dir} has classes {unknown} that {train_dir} does not have; '
        'labels come from the train class folders'
      )
    files, labels = _list_split(split_dir, classes)
    if files:
      eval_files[split] = (files, labels)

  if part.holdout:
    if base.HOLDOUT in eval_files:
      raise errors.UserError(
        f"{root} already has a split folder named 'holdout'; set --config.data.holdout=0 or "
        'rename the folder'
      )
    keep, held = part.holdout_indices(len(train_files))
    eval_files[base.HOLDOUT] = (_take(train_files, held), train_labels[held])
    train_files, train_labels = _take(train_files, keep), train_labels[keep]

  # Every process reads the same first training file, so all agree on the image shape even
  # when a split gives some of them no files at all.
  height, width, mode = _probe(train_files[0])
  shape = (height, width, 1 if mode == 'L' else 3)

  def decode_share(files: list[str], labels: np.ndarray, idx: np.ndarray):
    return _decode(_take(files, idx), shape, mode), labels[idx]

  train = decode_share(train_files, train_labels, part.train_share(len(train_files)))
  evals = {
    split: decode_share(files, labels, part.process_share(len(files)))
    for split, (files, labels) in eval_files.items()
  }

  sample = base.stats_sample(len(train_files))
  if part.process_count == 1:
    stats_images = train[0][sample]
  else:
    # This process holds only its share; decoding the fixed sample again keeps the statistics
    # identical on every process (they are compiled into the jitted step).
    stats_images = _decode(_take(train_files, sample), shape, mode)
  mean, std = base.channel_stats(stats_images)

  info = base.DatasetInfo(
    name=NAME,
    num_classes=len(classes),
    image_shape=shape,
    mean=mean,
    std=std,
    num_train=len(train_files),
    split_sizes={split: len(files) for split, (files, _) in eval_files.items()},
    in_memory=True,
    class_names=tuple(classes),
  )
  return base.InMemoryDataset(info, train, evals, process_count=part.process_count)


def _subfolders(path: str) -> list[str]:
  return sorted(
    entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith('.')
  )


def _list_split(split_dir: str, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """Image paths of a split, class by class in sorted order, and their int32 labels."""
  files, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    names = sorted(
      entry.name
      for entry in os.scandir(class_dir)
      if entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith('.')
    )
    files.extend(os.path.join(class_dir, n) for n in names)
    labels.extend([label] * len(names))
  return files, np.asarray(labels, np.int32)


def _take(items: list[str], idx: np.ndarray) -> list[str]:
  return [items[i] for i in idx]


def _probe(path: str) -> tuple[int, int, str]:
  """(height, width, Pillow mode to decode into) from a file's header."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      width, height = image.size
      _check_depth(path, image.mode)
      mode = 'L' if image.mode in _GRAY_MODES else 'RGB'
  except OSError as e:  # PIL.UnidentifiedImageError is an OSError.
    raise errors.UserError(f'cannot read image {path}: {e}') from e
  return height, width, mode


def _check_depth(path: str, mode: str) -> None:
  if mode.split(';')[0] in _WIDE_MODES:
    raise errors.UserError(
      f'image {path} has more than 8 bits per pixel (Pillow mode {mode}); convert the folder to '
      '8-bit images first (a conversion here would clip, not scale, the values)'
    )


def _decode(paths: list[str], shape: tuple[int, int, int], mode: str) -> np.ndarray:
  """Decodes `paths` into one uint8 array (n, H, W, C), in order, on a thread pool.

  Pillow releases the GIL while it reads and decodes, so threads overlap file I/O (which
  dominates on network disks) and the decoding of larger images.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  height, width, _ = shape
  out = np.empty((len(paths), *shape), np.uint8)

  def decode_range(start: int) -> None:
    for i in range(start, min(start + _CHUNK, len(paths))):
      path = paths[i]
      try:
        with Image.open(path) as image:
          if image.size != (width, height):
            raise errors.UserError(
              f"image {path} is {image.size[0]}x{image.size[1]} (WxH) but the dataset's "
              f'images are {width}x{height}; an image folder needs images of one size'
            )
          _check_depth(path, image.mode)
          if image.mode != mode:
            image = image.convert(mode)
          out[i] = np.asarray(image).reshape(shape)
      except OSError as e:
        raise errors.UserError(f'cannot decode image {path}: {e}') from e

  workers = min(os.cpu_count() or 1, 16, max(1, -(-len(paths) // _CHUNK)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for future in [pool.submit(decode_range, s) for s in range(0, len(paths), _CHUNK)]:
      future.result()  # Re-raises the first worker error here.
  return out
