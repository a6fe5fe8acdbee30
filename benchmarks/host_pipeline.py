"""Images/s of the streamed (ImageNet) host input pipeline on this machine; one JSON line.

  python benchmarks/host_pipeline.py [--batch_size 128] [--batches 40] [--image_size 224]
      [--threads auto,0] [--rounds 3]

Runs `StreamedDataset.train_iterator` — the code `gaternet train` feeds ImageNet configs through:
JPEG decoding of a random crop (`decode_and_crop_jpeg`), bicubic resize to `--image_size`, the
mirror, batching — over synthetic JPEGs of ILSVRC-2012's most common size (500x375, quality 90,
79 kB on average; 256 distinct ones repeated) served by a stand-in for the tfds builder, so it
needs no dataset. No model runs: this is the ceiling the host's CPU puts on training speed.

For each `--threads` setting (`auto`: a private tf.data thread pool with one thread per core and
no intra-op parallelism, the default; `0`: TensorFlow's shared pool, as before these options; N:
a private pool of N threads), every round times `--batches` batches after 3 warm-up batches;
the settings take turns round by round, and `images_per_s` holds each setting's median.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaternet_jax import environment  # noqa: E402

environment.prepare()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

from gaternet_jax.data import tfds_sources  # noqa: E402

NUM_IMAGES = 256
SHAPE = (375, 500)  # ILSVRC-2012's most common image size (height, width)


def _jpegs(tf) -> list[bytes]:
  """Smooth random images (a photo's spectrum, roughly) encoded as JPEGs."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(NUM_IMAGES):
    coarse = rng.uniform(0, 255, (SHAPE[0] // 25, SHAPE[1] // 25, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], SHAPE, method='bicubic')[0]
    image += rng.normal(0, 12, (*SHAPE, 3))
    pixels = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
    out.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
  return out


def _builder(tf, jpegs: list[bytes]):
  """What StreamedDataset reads of a tfds builder: name, label count, split sizes, records."""
  labels = np.arange(len(jpegs)) % 1000

  def as_dataset(split, shuffle_files=False, decoders=None):
    del split, shuffle_files, decoders
    return tf.data.Dataset.from_tensor_slices({'image': jpegs, 'label': labels}).repeat()

  sizes = {'train': 1_281_167, 'validation': 50_000}
  info = types.SimpleNamespace(
    features={'label': types.SimpleNamespace(num_classes=1000)},
    splits={k: types.SimpleNamespace(num_examples=v) for k, v in sizes.items()},
  )
  return types.SimpleNamespace(name='synthetic_imagenet', info=info, as_dataset=as_dataset)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--threads', default='auto,0')
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args(argv)
  tf, _ = tfds_sources.import_tf()
  builder = _builder(tf, _jpegs(tf))
  settings = args.threads.split(',')
  rates: dict[str, list[float]] = {s: [] for s in settings}
  for round_ in range(args.rounds):
    for setting in settings:
      dataset = tfds_sources.StreamedDataset(
        builder,
        image_size=args.image_size,
        shuffle_buffer=1024,
        process_index=0,
        process_count=1,
        eval_splits=('validation',),
        private_threads=None if setting == 'auto' else int(setting),
      )
      batches = dataset.train_iterator(args.batch_size, seed=round_, start_step=0)
      for _ in range(3):
        next(batches)
      start = time.perf_counter()
      for _ in range(args.batches):
        batch = next(batches)
      elapsed = time.perf_counter() - start
      assert batch['image'].shape == (args.batch_size, args.image_size, args.image_size, 3)
      rates[setting].append(args.batch_size * args.batches / elapsed)
  print(
    json.dumps(
      {
        'cores': os.cpu_count(),
        'batch_size': args.batch_size,
        'image_size': args.image_size,
        'source_image': f'{SHAPE[1]}x{SHAPE[0]} JPEG q90',
        'images_per_s': {s: round(statistics.median(r), 1) for s, r in rates.items()},
        'round_images_per_s': {s: [round(x, 1) for x in r] for s, r in rates.items()},
      }
    )
  )


if __name__ == '__main__':
  main()
