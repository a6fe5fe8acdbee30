"""PyTorch reference of the plain CIFAR ResNet-20: throughput, or an accuracy anchor; one JSON line.

  python benchmarks/pytorch_reference.py [--batch_size 128] [--steps 20] [--rounds 1]
  python benchmarks/pytorch_reference.py --train --data_dir DIR --workdir W [--epochs 15]
      [--seeds 0,1] [--holdout 5000]

Training mode (the accuracy anchor): for each seed, trains our ResNet-20 (`gaternet train
--config experiments/cifar10_resnet20.py:plain` on the image folder DIR, a subprocess) and this
file's PyTorch ResNet-20 on the same training images, with the same hold-out (the examples our
loader holds out, read through it), the same augmentation (4 zero pixels of padding, a random
32x32 crop, a mirror with probability 1/2), the same normalisation (the dataset's channel
statistics) and He et al.'s recipe at the same budget: batch 128, SGD with momentum 0.9 and
coupled weight decay 1e-4 on every parameter, learning rate 0.1 divided by 10 at 50% and 75% of
the steps, each epoch a fresh permutation of which the last partial batch is dropped. It prints
both hold-out top-1 errors (%) per seed and their means. Finished runs are kept in W and skipped
when the command is run again; interrupted ones resume (ours at their last checkpoint, the
PyTorch ones at their last epoch boundary).

A point of comparison for benchmarks/throughput.py's plain variant: the same network written in
torch.nn (3x3 conv 16, three stages of three post-activation basic units with 16/32/64 filters,
stride 2 at the first unit of stages 2 and 3, parameter-free option-A shortcuts as in
gaternet_jax/models/resnet_cifar.py, global average pooling, a 10-way classifier: 269,722
parameters, the count `gaternet describe` gives ours), measured on a fixed synthetic uint8 batch
normalized on the fly, as our training step does.

  training: forward, cross-entropy, backward and an SGD step (momentum 0.9, coupled
    weight decay 1e-4) in train mode, after 3 warm-up steps;
  inference: eval-mode forward under torch.inference_mode(), after 3 warm-up steps;

each in NCHW and in channels_last (NHWC, the layout JAX uses) memory format. Reports images/s.

torch is an optional dependency (the `benchmark` extra), never imported by gaternet_jax or its
tests. The CPU build:

  pip install 'torch==2.13.0+cpu'   # where a local wheel or mirror has it (PyPI has no +cpu builds)
  pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # elsewhere

(`pip install -e '.[benchmark]'` also works, but from PyPI it fetches the larger CUDA build on
Linux.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# CIFAR-10 channel statistics (0-255 scale), as in gaternet_jax/data/tfds_sources.py.
MEAN = tuple(m * 255.0 for m in (0.4914, 0.4822, 0.4465))
STD = tuple(s * 255.0 for s in (0.2470, 0.2435, 0.2616))
NUM_CLASSES = 10
WARMUP = 3
MEMORY_FORMATS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


class BasicUnit(nn.Module):
  """Post-activation basic block with option-A shortcut: layers.BasicUnit(projection=False).

  Convolutions use symmetric padding 1, as ours (model.strided_padding='symmetric').
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int):
    super().__init__()
    self.stride = stride
    self.extra = out_channels - in_channels
    # Bias-free convolutions: each is followed by batch norm, as in layers.conv.
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels)

  def shortcut(self, x: torch.Tensor) -> torch.Tensor:
    if self.stride == 1 and self.extra == 0:
      return x
    # Option A: subsample, then zero-pad channels evenly on both sides (as ours does), so the
    # shortcut has no parameters.
    x = x[:, :, :: self.stride, :: self.stride]
    return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs; n=3 is ResNet-20."""

  def __init__(self, units_per_stage: int = 3, num_classes: int = NUM_CLASSES):
    super().__init__()
    self.stem_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(16)
    units, in_channels = [], 16
    for s, channels in enumerate((16, 32, 64)):
      for u in range(units_per_stage):
        units.append(BasicUnit(in_channels, channels, 2 if (s > 0 and u == 0) else 1))
        in_channels = channels
    self.units = nn.Sequential(*units)
    self.head = nn.Linear(in_channels, num_classes)
    # He-normal (fan_out) convolutions, as ours; speed does not depend on it, but it keeps the
    # loss in the range our training step sees.
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    x = self.units(x)
    return self.head(x.mean(dim=(2, 3)))


def build_model() -> CifarResNet:
  return CifarResNet()


def num_params(model: nn.Module) -> int:
  """Trainable parameters (batch-norm running statistics are buffers, not counted)."""
  return sum(p.numel() for p in model.parameters())


def measure(
  batch_size: int = 128, steps: int = 20, memory_format: str = 'nchw', threads: int | None = None
) -> dict:
  """Training and inference images/s of a freshly built ResNet-20 in the given memory format."""
  if memory_format not in MEMORY_FORMATS:
    raise ValueError(
      f'memory_format must be one of {sorted(MEMORY_FORMATS)}, not {memory_format!r}'
    )
  if threads is not None:
    torch.set_num_threads(threads)
  fmt = MEMORY_FORMATS[memory_format]
  torch.manual_seed(0)  # same weights and data on every call, so calls are comparable
  model = build_model().to(memory_format=fmt)
  images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8)
  images = images.contiguous(memory_format=fmt)
  labels = torch.randint(0, NUM_CLASSES, (batch_size,))
  mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)

  def normalize(x: torch.Tensor) -> torch.Tensor:
    # Inside the timed loop, as our steps normalize each uint8 batch; elementwise ops keep x's
    # memory format.
    return (x.float() - mean) / std

  optimizer = torch.optim.SGD(
    model.parameters(), lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4
  )

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(normalize(images)), labels)
    loss.backward()
    optimizer.step()

  def infer_step():
    with torch.inference_mode():
      model(normalize(images))

  # CPU kernels run synchronously, so perf_counter around the loop times the work itself.
  def images_per_s(step) -> float:
    for _ in range(WARMUP):
      step()
    start = time.perf_counter()
    for _ in range(steps):
      step()
    return batch_size * steps / (time.perf_counter() - start)

  model.train()
  train = images_per_s(train_step)
  model.eval()
  inference = images_per_s(infer_step)
  return {'train_images_per_s': train, 'inference_images_per_s': inference}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SIZE = 128
CROP_PADDING = 4


def holdout_split(data_dir: str, holdout: int) -> dict:
  """Our loader's training and hold-out arrays of the image folder, and its channel statistics."""
  sys.path.insert(0, REPO)
  from gaternet_jax import data  # noqa: PLC0415 - JAX only in training mode

  config = data.default_data_config()
  config.update(name='imagefolder', data_dir=data_dir, holdout=holdout, eval_split='holdout')
  dataset = data.load_dataset(config)
  info = dataset.info
  return {
    'train': dataset.train_arrays(),
    'holdout': dataset.eval_arrays('holdout'),
    'mean': info.mean,
    'std': info.std,
  }


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Pad-crop-flip of uint8 NHWC images, as gaternet_jax/data/augment.random_crop_flip."""
  n, h, w, _ = images.shape
  p = CROP_PADDING
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  dy, dx = rng.integers(0, 2 * p + 1, size=(2, n))
  flips = rng.random(n) < 0.5
  out = np.empty_like(images)
  for i in range(n):
    crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def train_torch(split: dict, epochs: float, seed: int, checkpoint: str | None = None) -> dict:
  """Trains this file's ResNet-20 with He et al.'s recipe; its hold-out top-1 error and time.

  With `checkpoint` (a file path), the model, optimizer, step, data-order generator and elapsed
  time are saved there at every epoch boundary and restored from it on the next call, so an
  interrupted run resumes where its last epoch ended and computes what it would have computed.
  """
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  model = build_model()
  images, labels = split['train']
  steps_per_epoch = len(images) // BATCH_SIZE
  total = int(round(epochs * steps_per_epoch))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  mean = torch.tensor(split['mean'], dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(split['std'], dtype=torch.float32).view(1, 3, 1, 1)

  def inputs(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return (x - mean) / std

  step, elapsed = 0, 0.0
  if checkpoint and os.path.exists(checkpoint):
    saved = torch.load(checkpoint, weights_only=False)
    model.load_state_dict(saved['model'])
    optimizer.load_state_dict(saved['optimizer'])
    rng.bit_generator.state = saved['rng']
    step, elapsed = saved['step'], saved['elapsed_s']
  started = time.time() - elapsed
  model.train()
  order = np.empty(0, np.int64)
  while step < total:
    if step % steps_per_epoch == 0:
      if checkpoint and step:
        state = {
          'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
          'rng': rng.bit_generator.state, 'elapsed_s': time.time() - started,
        }  # fmt: skip
        torch.save(state, checkpoint + '.tmp')
        os.replace(checkpoint + '.tmp', checkpoint)
      order = rng.permutation(len(images))
    index = order[(step % steps_per_epoch) * BATCH_SIZE :][:BATCH_SIZE]
    lr = 0.1 * (0.1 ** sum(step >= b * total for b in (0.5, 0.75)))
    for group in optimizer.param_groups:
      group['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    logits = model(inputs(augment(images[index], rng)))
    F.cross_entropy(logits, torch.from_numpy(labels[index]).long()).backward()
    optimizer.step()
    step += 1
  model.eval()
  held_images, held_labels = split['holdout']
  correct = 0
  with torch.inference_mode():
    for start in range(0, len(held_images), 500):
      logits = model(inputs(held_images[start : start + 500]))
      correct += int((logits.argmax(1).numpy() == held_labels[start : start + 500]).sum())
  return {
    'holdout_top1_error': 100.0 * (1.0 - correct / len(held_images)),  # percent, as ours
    'steps': total,
    # A fingerprint of the trained weights: a resumed run must end on the same ones.
    'parameter_sum': float(sum(p.detach().double().sum() for p in model.parameters())),
    'wall_time_s': time.time() - started,
  }


def train_ours(data_dir: str, workdir: str, epochs: float, seed: int, holdout: int) -> dict:
  """`gaternet train` of the plain ResNet-20 on the same folder and hold-out; its results."""
  command = [
    sys.executable, '-m', 'gaternet_jax.main', 'train',
    '--config', os.path.join(REPO, 'experiments', 'cifar10_resnet20.py:plain'),
    '--workdir', workdir, '--config.data.name=imagefolder', f'--config.data.data_dir={data_dir}',
    f'--config.data.holdout={holdout}', '--config.data.eval_split=holdout',
    f'--config.schedule.num_epochs={epochs}', f'--config.seed={seed}',
  ]  # fmt: skip
  subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  return {
    'holdout_top1_error': results['eval']['top1_error'],
    'steps': results['step'],
    'wall_time_s': results['wall_time_s'],
  }


def parity(data_dir: str, workdir: str, epochs: float, seeds: list[int], holdout: int) -> dict:
  """Both implementations per seed (finished ones read back from `workdir`); both means."""
  os.makedirs(workdir, exist_ok=True)
  split = None
  result = {'epochs': epochs, 'holdout': holdout, 'torch_version': torch.__version__}
  for impl in ('ours', 'torch'):
    runs = {}
    for seed in seeds:
      done = os.path.join(workdir, f'{impl}_seed{seed}.json')
      if os.path.exists(done):
        with open(done) as f:
          runs[seed] = json.load(f)
        continue
      if impl == 'ours':
        runs[seed] = train_ours(
          data_dir, os.path.join(workdir, f'ours_seed{seed}'), epochs, seed, holdout
        )
      else:
        split = split or holdout_split(data_dir, holdout)
        runs[seed] = train_torch(split, epochs, seed, os.path.join(workdir, f'torch_seed{seed}.pt'))
      with open(done + '.tmp', 'w') as f:
        json.dump(runs[seed], f)
      os.replace(done + '.tmp', done)
    errors = [runs[s]['holdout_top1_error'] for s in seeds]
    result[impl] = {
      'holdout_top1_error': {str(s): e for s, e in zip(seeds, errors)},
      'mean': statistics.mean(errors),
      'wall_time_s': {str(s): runs[s]['wall_time_s'] for s in seeds},
    }
  result['mean_difference'] = result['ours']['mean'] - result['torch']['mean']
  return result


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
  parser.add_argument('--rounds', type=int, default=1, help='repetitions; medians are reported')
  parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's)")
  parser.add_argument('--train', action='store_true', help='the accuracy anchor (see above)')
  parser.add_argument('--data_dir', help='training mode: an image folder with train/')
  parser.add_argument('--workdir', help='training mode: where both runs and their results go')
  parser.add_argument('--epochs', type=float, default=15.0)
  parser.add_argument('--seeds', default='0,1')
  parser.add_argument('--holdout', type=int, default=5000)
  args = parser.parse_args(argv)
  if args.threads is not None:
    torch.set_num_threads(args.threads)
  if args.train:
    if not args.data_dir or not args.workdir:
      parser.error('--train needs --data_dir and --workdir')
    seeds = [int(s) for s in args.seeds.split(',')]
    print(json.dumps(parity(args.data_dir, args.workdir, args.epochs, seeds, args.holdout)))
    return
  result = {
    'torch_version': torch.__version__,
    'threads': torch.get_num_threads(),
    'batch_size': args.batch_size,
  }
  for fmt in MEMORY_FORMATS:
    runs = [measure(args.batch_size, args.steps, fmt) for _ in range(args.rounds)]
    result[fmt] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
