"""Tests of gaternet_jax.data: the offline sources, ImageFolder, tfds (mocked), augmentation.

No network and no files outside tmp_path. The tfds tests skip when TensorFlow is not installed.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from gaternet_jax import data
from gaternet_jax.data import augment, base
from gaternet_jax.errors import DatasetNotFoundError, UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**overrides) -> ml_collections.ConfigDict:
  config = data.default_data_config()
  config.update(overrides)
  return config


def _rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
  """Each example as bytes, sorted: a multiset that compares splits regardless of order."""
  return sorted(
    image.tobytes() + int(label).to_bytes(4, 'little') for image, label in zip(images, labels)
  )


def _masked_in(batches: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """The rows of padded batches whose mask is 1, in order."""
  keep = np.concatenate([b['mask'] for b in batches]) == 1
  return (
    np.concatenate([b['image'] for b in batches])[keep],
    np.concatenate([b['label'] for b in batches])[keep],
  )


# --- The embedded default dataset. ---------------------------------------------------------------


@pytest.fixture(scope='module')
def default_dataset() -> data.Dataset:
  return data.load_dataset(_config())


def test_default_shapes_and_splits(default_dataset):
  info = default_dataset.info
  assert info.name == 'default' and info.in_memory
  assert info.num_classes == 10
  assert info.image_shape == (16, 16, 1)
  assert info.num_train == 1500 and info.split_sizes == {'test': 297}
  images, labels = default_dataset.train_arrays()
  assert images.shape == (1500, 16, 16, 1) and images.dtype == np.uint8
  assert labels.shape == (1500,) and labels.dtype == np.int32
  assert labels.min() == 0 and labels.max() == 9
  assert images.max() == 255 and images.min() == 0
  test_images, test_labels = default_dataset.eval_arrays('test')
  assert test_images.shape == (297, 16, 16, 1) and test_labels.dtype == np.int32
  # Statistics of the training images, as computed from the arrays themselves.
  np.testing.assert_allclose(info.mean, [images.mean()], rtol=1e-6)
  np.testing.assert_allclose(info.std, [images.std()], rtol=1e-6)


def test_default_is_deterministic(default_dataset):
  again = data.load_dataset(_config())
  assert again.info == default_dataset.info
  for a, b in zip(
    again.train_arrays() + again.eval_arrays('test'),
    default_dataset.train_arrays() + default_dataset.eval_arrays('test'),
  ):
    np.testing.assert_array_equal(a, b)


def test_default_process_parts_are_disjoint_and_cover_train(default_dataset):
  parts = [data.load_dataset(_config(), process_index=p, process_count=2) for p in range(2)]
  assert parts[0].info == parts[1].info == default_dataset.info
  sizes = [len(part.train_arrays()[0]) for part in parts]
  assert sizes == [750, 750]
  union = (
    np.concatenate([p.train_arrays()[0] for p in parts]),
    np.concatenate([p.train_arrays()[1] for p in parts]),
  )
  assert _rows(*union) == _rows(*default_dataset.train_arrays())


def test_unknown_name_lists_known_ones():
  with pytest.raises(UserError, match='imagefolder') as e:
    data.load_dataset(_config(name='mnist'))
  assert "'mnist'" in str(e.value) and '\n' not in str(e.value)


def test_missing_eval_split_fails_at_load():
  with pytest.raises(UserError, match='holdout'):
    data.load_dataset(_config(eval_split='holdout'))
  with pytest.raises(UserError, match='validation'):
    data.load_dataset(_config(eval_split='validation'))


# --- Hold-out. -----------------------------------------------------------------------------------


def test_holdout(default_dataset):
  config = _config(holdout=300, holdout_seed=7, eval_split='holdout')
  held = data.load_dataset(config)
  assert held.info.num_train == 1200
  assert held.info.split_sizes == {'test': 297, 'holdout': 300}
  train, holdout = held.train_arrays(), held.eval_arrays('holdout')
  assert len(holdout[0]) == 300
  # Disjoint from train, and together exactly the original training set.
  joined = np.concatenate([train[0], holdout[0]]), np.concatenate([train[1], holdout[1]])
  assert _rows(*joined) == _rows(*default_dataset.train_arrays())

  # The same hold-out on every process: the processes' parts add up to it.
  parts = [data.load_dataset(config, process_index=p, process_count=2) for p in range(2)]
  assert parts[0].info == parts[1].info == held.info
  union = [np.concatenate([p.eval_arrays('holdout')[i] for p in parts]) for i in range(2)]
  assert _rows(*union) == _rows(*holdout)

  # Fixed by the seed.
  same = data.load_dataset(config).eval_arrays('holdout')
  np.testing.assert_array_equal(same[0], holdout[0])
  other = data.load_dataset(_config(holdout=300, holdout_seed=8)).eval_arrays('holdout')
  assert _rows(*other) != _rows(*holdout)


def test_impossible_holdout_is_a_user_error():
  with pytest.raises(UserError, match='holdout'):
    data.load_dataset(_config(holdout=1500))
  with pytest.raises(UserError, match='holdout'):
    data.load_dataset(_config(holdout=-1))


def test_process_slice_shares():
  """Each process's share is disjoint from the others' and all of them cover every example; the
  training share depends only on the device's mesh position (2 x 2 devices train as 1 x 4)."""
  slices = [
    base.ProcessSlice(process_index=p, process_count=2, devices_per_process=2) for p in range(2)
  ]
  np.testing.assert_array_equal(slices[1].process_share(7), [1, 3, 5])
  np.testing.assert_array_equal(slices[1].train_share(11), [2, 3, 6, 7, 10])
  for share in ('process_share', 'train_share'):
    union = np.concatenate([getattr(s, share)(11) for s in slices])
    np.testing.assert_array_equal(np.sort(union), np.arange(11))
  whole = base.ProcessSlice(devices_per_process=4).train_share(11)
  np.testing.assert_array_equal(whole, np.arange(11))
  train, held = base.ProcessSlice(holdout=3, holdout_seed=1).holdout_indices(10)
  assert len(held) == 3 and np.array_equal(np.sort(np.concatenate([train, held])), np.arange(10))
  with pytest.raises(ValueError, match='process_index'):
    base.ProcessSlice(process_index=2, process_count=2)


# --- Padded, masked evaluation batches. ----------------------------------------------------------


def test_eval_batches_pads_and_masks():
  images = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1) + 1
  labels = np.arange(10, dtype=np.int64) + 1
  batches = list(data.eval_batches(images, labels, 4))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (4, 2, 2, 1) and b['image'].dtype == np.uint8
    assert b['label'].shape == (4,) and b['label'].dtype == np.int32
    assert b['mask'].shape == (4,) and b['mask'].dtype == np.float32
  assert sum(b['mask'].sum() for b in batches) == 10
  kept_images, kept_labels = _masked_in(batches)
  np.testing.assert_array_equal(kept_images, images)
  np.testing.assert_array_equal(kept_labels, labels)
  last = batches[-1]
  np.testing.assert_array_equal(last['mask'], [1, 1, 0, 0])
  assert not last['image'][2:].any() and not last['label'][2:].any()

  forced = list(data.eval_batches(images, labels, 4, num_batches=5))
  assert len(forced) == 5 and forced[3]['mask'].sum() == forced[4]['mask'].sum() == 0
  with pytest.raises(ValueError):
    list(data.eval_batches(images, labels, 4, num_batches=2))
  # An empty part still yields its (all-masked) batch, to keep processes in lock step.
  empty = list(data.eval_batches(images[:0], labels[:0], 4, num_batches=2))
  assert len(empty) == 2 and sum(b['mask'].sum() for b in empty) == 0


def test_eval_iterator_lock_step(default_dataset):
  # 297 test images: 149 + 148 over two processes; 37 divides 148 but not 149.
  batch = 37
  whole = list(default_dataset.eval_iterator('test', batch))
  assert sum(b['mask'].sum() for b in whole) == 297
  np.testing.assert_array_equal(_masked_in(whole)[1], default_dataset.eval_arrays('test')[1])
  parts = [data.load_dataset(_config(), process_index=p, process_count=2) for p in range(2)]
  per_process = [list(part.eval_iterator('test', batch)) for part in parts]
  assert len(per_process[0]) == len(per_process[1]) == 5
  assert [sum(b['mask'].sum() for b in batches) for batches in per_process] == [149, 148]
  for part, batches in zip(parts, per_process):
    np.testing.assert_array_equal(_masked_in(batches)[1], part.eval_arrays('test')[1])
  assert per_process[1][-1]['mask'].sum() == 0
  # The training split can be scored too; an unknown split is a user error.
  train_batches = list(default_dataset.eval_iterator('train', 512))
  assert len(train_batches) == 3 and sum(b['mask'].sum() for b in train_batches) == 1500
  with pytest.raises(UserError, match='nope'):
    default_dataset.eval_iterator('nope', 8)


# --- ImageFolder. --------------------------------------------------------------------------------

# Deliberately not in alphabetical order on disk creation: labels must follow sorted names.
_CLASSES = ('zebra', 'ant', 'moose')


def _write_folder(root: pathlib.Path, splits: dict[str, int], size=(8, 8)) -> None:
  """Writes `count` images per class per split; pixel value = 40 * label + 2 * index + 1."""
  for split, count in splits.items():
    for name in _CLASSES:
      label = sorted(_CLASSES).index(name)
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        value = 40 * label + 2 * i + 1
        pixels = np.full((*size, 3), value, np.uint8)
        # ant is JPEG (both spellings, lossy: kept flat); the others PNG, exact and not flat.
        suffix = ('.jpg' if i % 2 else '.JPEG') if name == 'ant' else '.png'
        if suffix == '.png':
          pixels[0, 0] = (value, 255 - value, 7)
        Image.fromarray(pixels).save(folder / f'{i:03d}{suffix}')


def test_imagefolder(tmp_path):
  _write_folder(tmp_path, {'train': 7, 'test': 2})
  (tmp_path / 'train' / 'moose' / 'notes.txt').write_text('not an image')
  dataset = data.load_dataset(_config(name='imagefolder', data_dir=str(tmp_path)))
  info = dataset.info
  assert info.in_memory and info.num_classes == 3 and info.image_shape == (8, 8, 3)
  assert info.num_train == 21 and info.split_sizes == {'test': 6}
  images, labels = dataset.train_arrays()
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  # Sorted class names: ant=0, moose=1, zebra=2; files in name order within a class.
  np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 7))
  expected = 40 * labels + 2 * np.tile(np.arange(7), 3) + 1
  centre = images[:, 4, 4, 0].astype(int)
  png = labels != 0
  np.testing.assert_array_equal(centre[png], expected[png])
  assert np.abs(centre[~png] - expected[~png]).max() <= 3  # JPEG is lossy.
  np.testing.assert_allclose(info.mean, images.reshape(-1, 3).mean(0), rtol=1e-6)
  test_labels = dataset.eval_arrays('test')[1]
  np.testing.assert_array_equal(test_labels, np.repeat([0, 1, 2], 2))

  held = data.load_dataset(
    _config(name='imagefolder', data_dir=str(tmp_path), holdout=5, eval_split='holdout')
  )
  assert held.info.num_train == 16 and held.info.split_sizes == {'test': 6, 'holdout': 5}
  joined = [
    np.concatenate([held.train_arrays()[i], held.eval_arrays('holdout')[i]]) for i in range(2)
  ]
  assert _rows(*joined) == _rows(images, labels)
  parts = [
    data.load_dataset(
      _config(name='imagefolder', data_dir=str(tmp_path), holdout=5),
      process_index=p,
      process_count=2,
    )
    for p in range(2)
  ]
  assert parts[0].info == parts[1].info == held.info
  assert [len(p.train_arrays()[0]) for p in parts] == [8, 8]
  union = [np.concatenate([p.eval_arrays('holdout')[i] for p in parts]) for i in range(2)]
  assert _rows(*union) == _rows(*held.eval_arrays('holdout'))


def test_imagefolder_missing_root(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(DatasetNotFoundError) as e:
    data.load_dataset(_config(name='imagefolder', data_dir=str(missing)))
  assert str(missing) in str(e.value) and '\n' not in str(e.value)
  (tmp_path / 'only_test' / 'test' / 'a').mkdir(parents=True)
  with pytest.raises(DatasetNotFoundError, match='train'):
    data.load_dataset(_config(name='imagefolder', data_dir=str(tmp_path / 'only_test')))
  with pytest.raises(UserError, match='data_dir'):
    data.load_dataset(_config(name='imagefolder'))


def test_imagefolder_mixed_sizes(tmp_path):
  _write_folder(tmp_path, {'train': 2})
  odd = tmp_path / 'train' / 'moose' / 'zzz.png'
  Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(odd)
  with pytest.raises(UserError, match='zzz.png') as e:
    data.load_dataset(_config(name='imagefolder', data_dir=str(tmp_path)))
  assert '\n' not in str(e.value)


def test_imagefolder_with_one_class_is_refused(tmp_path):
  folder = tmp_path / 'train' / 'only'
  folder.mkdir(parents=True)
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f'{i}.png')
  with pytest.raises(UserError, match='one class') as e:
    data.load_dataset(_config(name='imagefolder', data_dir=str(tmp_path), holdout=1))
  assert '\n' not in str(e.value)


def test_imagefolder_with_an_empty_class_folder_is_refused(tmp_path):
  _write_folder(tmp_path, {'train': 2, 'test': 1})
  (tmp_path / 'train' / 'yak').mkdir()  # would be an extra class no example has
  with pytest.raises(UserError, match='yak has no') as e:
    data.load_dataset(_config(name='imagefolder', data_dir=str(tmp_path)))
  assert '\n' not in str(e.value)


def test_imagefolder_with_16_bit_images_is_refused(tmp_path):
  _write_folder(tmp_path, {'train': 2, 'test': 1})
  deep = tmp_path / 'train' / 'moose' / 'deep.png'
  Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep)
  assert Image.open(deep).mode.startswith('I')
  with pytest.raises(UserError, match='deep.png has more than 8 bits') as e:
    data.load_dataset(_config(name='imagefolder', data_dir=str(tmp_path)))
  assert '\n' not in str(e.value)


def test_imagefolder_without_eval_folder_needs_holdout(tmp_path):
  _write_folder(tmp_path, {'train': 3})
  with pytest.raises(UserError, match='test'):
    data.load_dataset(_config(name='imagefolder', data_dir=str(tmp_path)))
  dataset = data.load_dataset(
    _config(name='imagefolder', data_dir=str(tmp_path), holdout=2, eval_split='holdout')
  )
  assert dataset.info.split_sizes == {'holdout': 2}


# --- No TensorFlow on the in-memory path. --------------------------------------------------------


@pytest.mark.slow
def test_in_memory_path_does_not_import_tensorflow(tmp_path):
  _write_folder(tmp_path, {'train': 2})
  code = (
    'import sys\n'
    'import gaternet_jax.data as data\n'
    'import gaternet_jax.data.augment, gaternet_jax.data.embedded\n'
    'import gaternet_jax.data.imagefolder\n'
    'data.load_dataset(data.default_data_config())\n'
    'config = data.default_data_config()\n'
    f'config.update(name="imagefolder", data_dir={str(tmp_path)!r}, holdout=1,\n'
    '              eval_split="holdout")\n'
    'data.load_dataset(config)\n'
    'leaked = [m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules]\n'
    'assert not leaked, leaked\n'
  )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  result = subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]


# --- tfds sources, mocked. -----------------------------------------------------------------------


@pytest.fixture(scope='module')
def tfds():
  pytest.importorskip('tensorflow')
  return pytest.importorskip('tensorflow_datasets')


@pytest.mark.slow
def test_cifar10_mocked(tfds):
  with tfds.testing.mock_data(num_examples=10):
    dataset = data.load_dataset(_config(name='cifar10', holdout=3, eval_split='holdout'))
    parts = [
      data.load_dataset(_config(name='cifar10', holdout=3), process_index=p, process_count=2)
      for p in range(2)
    ]
  info = dataset.info
  assert info.in_memory and info.num_classes == 10 and info.image_shape == (32, 32, 3)
  assert info.num_train == 7 and info.split_sizes == {'test': 10, 'holdout': 3}
  np.testing.assert_allclose(info.mean, np.array([0.4914, 0.4822, 0.4465]) * 255)
  images, labels = dataset.train_arrays()
  assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < 10
  assert [len(p.train_arrays()[0]) for p in parts] == [4, 3]
  batches = list(dataset.eval_iterator('test', 4))
  assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 10
  np.testing.assert_array_equal(_masked_in(batches)[0], dataset.eval_arrays('test')[0])


def test_imagenet_mocked_streaming(tfds):
  config = _config(name='imagenet2012', image_size=32, eval_split='validation', shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=10):
    dataset = data.load_dataset(config)
    info = dataset.info
    assert not info.in_memory and info.image_shape == (32, 32, 3) and info.num_classes == 1000
    assert info.num_train == 10 and info.split_sizes == {'validation': 10}
    np.testing.assert_allclose(info.std, np.array([0.229, 0.224, 0.225]) * 255)

    def take(iterator, n):
      return [next(iterator) for _ in range(n)]

    # 6 batches of 4 run through three epochs of 10 examples.
    first = take(dataset.train_iterator(4, seed=1, start_step=0), 6)
    for b in first:
      assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.uint8
      assert b['label'].shape == (4,) and b['label'].dtype == np.int32
    again = take(dataset.train_iterator(4, seed=1, start_step=0), 6)
    resumed = take(dataset.train_iterator(4, seed=1, start_step=3), 3)
    other = take(dataset.train_iterator(4, seed=2, start_step=0), 1)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a['image'], b['image'])
    for a, b in zip(first[3:], resumed):  # Resume reproduces the uninterrupted run.
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(other[0]['image'], first[0]['image'])
    # Each epoch holds every example once: labels of epoch 1 (examples 0-9) are a permutation of
    # epoch 2's (examples 10-19).
    labels = np.concatenate([b['label'] for b in first])
    assert sorted(labels[:10]) == sorted(labels[10:20])

    parts = [data.load_dataset(config, process_index=p, process_count=2) for p in range(2)]
    per_process = [list(part.eval_iterator('validation', 4)) for part in parts]
    assert [len(batches) for batches in per_process] == [2, 2]
    assert [sum(b['mask'].sum() for b in batches) for batches in per_process] == [5, 5]
    for batches in per_process:
      assert batches[0]['image'].shape == (4, 32, 32, 3)
      assert not batches[-1]['image'][1:].any()

    with pytest.raises(UserError, match='holdout'):
      data.load_dataset(_config(name='imagenet2012', holdout=5))


def test_streamed_pipeline_threads_change_no_batch(tfds):
  """tf.data's private thread pool (one thread per core by default; 0: TensorFlow's shared pool)
  is a speed setting only: every setting yields the same batches."""
  from gaternet_jax.data import tfds_sources  # noqa: PLC0415

  options = tfds_sources._pipeline_options()  # noqa: SLF001
  assert options.threading.private_threadpool_size == os.cpu_count()
  assert options.threading.max_intra_op_parallelism == 1 and options.deterministic
  assert tfds_sources._pipeline_options(0).threading.private_threadpool_size is None  # noqa: SLF001
  config = _config(name='imagenet2012', image_size=16, eval_split='validation', shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=10):
    builder = data.load_dataset(config)._builder  # noqa: SLF001
    batches = {}
    for threads in (None, 0, 3):
      dataset = tfds_sources.StreamedDataset(
        builder, image_size=16, shuffle_buffer=8, process_index=0, process_count=1,
        eval_splits=('validation',), private_threads=threads,
      )  # fmt: skip
      train = dataset.train_iterator(4, seed=1, start_step=0)
      batches[threads] = [next(train)['image'] for _ in range(3)]
      batches[threads] += [b['image'] for b in dataset.eval_iterator('validation', 4)]
  for threads in (0, 3):
    for a, b in zip(batches[None], batches[threads]):
      np.testing.assert_array_equal(a, b)


def test_missing_tfds_dataset(tfds, tmp_path):
  del tfds
  with pytest.raises(DatasetNotFoundError) as e:
    data.load_dataset(_config(name='cifar10', data_dir=str(tmp_path)))
  message = str(e.value)
  assert '\n' not in message and str(tmp_path) in message and 'cifar10' in message


# --- On-device augmentation. ---------------------------------------------------------------------


def _distinct_images(batch: int, size: int = 6) -> np.ndarray:
  """Images with no symmetry and no repeated pixel, so every crop and flip is recognizable."""
  values = np.arange(batch * size * size * 3) % 251 + 1
  return values.reshape(batch, size, size, 3).astype(np.uint8)


def test_random_crop_flip_shape_and_determinism():
  images = jnp.asarray(_distinct_images(5))
  crop = jax.jit(lambda key, x: augment.random_crop_flip(key, x, padding=2))
  out = crop(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  np.testing.assert_array_equal(out, crop(jax.random.key(0), images))
  assert not np.array_equal(out, crop(jax.random.key(1), images))


def test_random_crop_flip_without_padding_only_flips():
  images = _distinct_images(32)
  out = np.asarray(augment.random_crop_flip(jax.random.key(0), jnp.asarray(images), padding=0))
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
  kept = [np.array_equal(o, i) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)  # Flip really mirrors, and not always.
  # A key that does not flip a single image gives the identity.
  crop = jax.jit(lambda key, x: augment.random_crop_flip(key, x, padding=0))
  for seed in range(100):
    single = crop(jax.random.key(seed), jnp.asarray(images[:1]))
    if np.array_equal(single, images[:1]):
      break
  else:
    pytest.fail('no key in 100 left the image unflipped')


def test_random_crop_offsets_differ_across_batch():
  padding, size = 3, 6
  images = _distinct_images(16, size)
  out = np.asarray(
    augment.random_crop_flip(jax.random.key(3), jnp.asarray(images), padding=padding)
  )
  padded = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  offsets = set()
  for o, p in zip(out, padded):
    matches = [
      (dy, dx)
      for dy in range(2 * padding + 1)
      for dx in range(2 * padding + 1)
      for window in [p[dy : dy + size, dx : dx + size]]
      if np.array_equal(o, window) or np.array_equal(o, window[:, ::-1])
    ]
    assert matches, 'output is not a (mirrored) crop of the padded image'
    offsets.add(matches[0])
  assert len(offsets) > 1


def test_normalize():
  images = _distinct_images(2)
  mean, std = (120.0, 110.5, 100.25), (60.0, 61.5, 70.125)
  out = augment.normalize(jnp.asarray(images), mean, std)
  assert out.dtype == jnp.float32
  expected = (images.astype(np.float32) - np.float32(mean)) / np.float32(std)
  # XLA may divide by multiplying with the reciprocal: equal up to float32 rounding.
  np.testing.assert_allclose(np.asarray(out), expected, rtol=3e-7, atol=0)
  half = augment.normalize(jnp.asarray(images), mean, std, dtype=jnp.bfloat16)
  assert half.dtype == jnp.bfloat16


def test_constant_channel_gets_a_nonzero_std():
  from gaternet_jax.data import base  # noqa: PLC0415

  images = np.zeros((4, 2, 2, 3), np.uint8)
  images[..., 0] = np.arange(4)[:, None, None] * 10
  mean, std = base.channel_stats(images)
  assert std[1] == std[2] == base.MIN_STD and std[0] > 1


def test_random_resized_crop_reaches_eight_percent_of_the_image():
  # min_object_covered=0.1 against the whole-image box used to floor the crop's area at 10%.
  from gaternet_jax.data import tfds_sources  # noqa: PLC0415

  tf, _ = tfds_sources.import_tf()
  jpeg = tf.io.encode_jpeg(tf.zeros((200, 200, 3), tf.uint8))
  shape = tf.io.extract_jpeg_shape(jpeg)
  areas = []
  for i in range(1500):
    _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4]),
      seed=[i, 0],
      min_object_covered=tfds_sources._CROP_MIN_COVERED,
      aspect_ratio_range=tfds_sources._CROP_ASPECT,
      area_range=tfds_sources._CROP_AREA,
      max_attempts=tfds_sources._CROP_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
    )
    areas.append(float(size[0] * size[1]) / (200 * 200))
  assert 0.075 <= min(areas) < 0.09  # was 0.100 with min_object_covered=0.1
  crop = tfds_sources._random_resized_crop(tf, jpeg, 64, tf.constant([1, 2]))
  assert tuple(crop.shape) == (64, 64, 3) and crop.dtype == tf.uint8


def test_a_tensorflow_that_already_holds_a_gpu_is_reported(monkeypatch, caplog):
  # TensorFlow initialised elsewhere first cannot be told to drop its GPUs any more; that used to
  # pass in silence.
  import logging  # noqa: PLC0415

  import tensorflow as tf  # noqa: PLC0415

  from gaternet_jax.data import tfds_sources  # noqa: PLC0415

  def already_initialised(devices, kind):
    raise RuntimeError('Visible devices cannot be modified after being initialized')

  monkeypatch.setattr(tf.config, 'set_visible_devices', already_initialised)
  monkeypatch.setattr(tf.config, 'get_visible_devices', lambda kind: ['GPU:0'])
  with caplog.at_level(logging.WARNING):
    tfds_sources.import_tf()
  assert 'holds 1' in caplog.text and 'JAX needs' in caplog.text
  monkeypatch.setattr(tf.config, 'get_visible_devices', lambda kind: [])
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tfds_sources.import_tf()
  assert 'holds' not in caplog.text
