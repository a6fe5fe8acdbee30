"""`gaternet compile`: a TPU pod launch checked on a machine without a TPU.

The same mesh, shardings, state and training and evaluation steps `gaternet train` builds on a
slice are compiled ahead of time for that slice's topology (`jax.experimental.topologies`, with
the TPU compiler from `libtpu`: `pip install -e '.[tpu]'`), and the compiler's own analyses give,
per chip: the bytes of the replicated state and of the batch share, the temporary bytes, the
peak against the chip's HBM, the FLOPs and bytes accessed of one step, and a projected step time
from a roofline of the chip's peak bf16 FLOP/s and HBM bandwidth. These are compiler estimates,
not measurements: the projection ignores the input pipeline, collectives' latency and whatever
the roofline cannot see.

Slices are named as Cloud TPU names them (`v4-32`: 32 TensorCores, 16 v4 chips, one JAX device
per chip (megacore); `v5e-64`: 64 chips), or by their raw topology (`v4:2x2x4`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from gaternet_jax import configs
from gaternet_jax.commands import describe
from gaternet_jax.data.base import DatasetInfo
from gaternet_jax.errors import UserError
from gaternet_jax.models import layers
from gaternet_jax.training import steps


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU chip's public peak figures (cloud.google.com/tpu/docs/<generation>, 2026-12)."""

  generation: str
  peak_bf16_flops: float  # per chip, FLOP/s
  hbm_bytes: int  # per chip
  hbm_bytes_per_s: float  # per chip
  megacore: bool  # two TensorCores seen as one device


GIB = 1 << 30
CHIPS = {
  'v4': Chip('v4', 275e12, 32 * GIB, 1200e9, megacore=True),
  'v5e': Chip('v5e', 197e12, 16 * GIB, 819e9, megacore=False),
  'v5p': Chip('v5p', 459e12, 95 * GIB, 2765e9, megacore=True),
  'v6e': Chip('v6e', 918e12, 32 * GIB, 1640e9, megacore=False),
}
# The prefix of a raw topology name (`v4:2x2x4`) for each generation.
TOPOLOGY_PREFIX = {'v4': 'v4', 'v5e': 'v5e', 'v5p': 'v5', 'v6e': 'v6e'}
# Chip grids of the slice sizes Cloud TPU offers: 3-D for the megacore generations (v4, v5p),
# 2-D for the others (the shapes MaxText's accelerator_to_spec_map uses).
GRIDS_3D = {
  4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8',
  512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16',
}  # fmt: skip
GRIDS_2D = {
  1: '1x1',
  4: '2x2',
  8: '2x4',
  16: '4x4',
  32: '4x8',
  64: '8x8',
  128: '8x16',
  256: '16x16',
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  chip: Chip
  topology: str  # e.g. 'v4:2x2x4'
  devices: int  # JAX devices: chips

  @property
  def chip_config(self) -> str:
    return 'megacore' if self.chip.megacore else 'default'


def known_names() -> list[str]:
  names = []
  for gen, chip in CHIPS.items():
    grids = GRIDS_3D if chip.megacore else GRIDS_2D
    names += [f'{gen}-{chips * (2 if chip.megacore else 1)}' for chips in grids]
  return names


def parse_slice(name: str) -> Slice:
  """A slice by Cloud TPU name (`v4-32`, `v5e-64`, `v5p-128`) or raw topology (`v4:2x2x4`)."""
  text = name.strip().lower()
  if ':' in text:
    prefix, _, grid = text.partition(':')
    gens = [g for g, p in TOPOLOGY_PREFIX.items() if p == prefix]
    dims = grid.split('x')
    if gens and dims and all(d.isdigit() and int(d) > 0 for d in dims):
      chip = CHIPS[gens[0]]
      if len(dims) == (3 if chip.megacore else 2):
        return Slice(name, chip, text, math.prod(int(d) for d in dims))
  else:
    gen, _, size = text.rpartition('-')
    if gen in CHIPS and size.isdigit():
      chip = CHIPS[gen]
      chips = int(size) // 2 if chip.megacore else int(size)
      grid = (GRIDS_3D if chip.megacore else GRIDS_2D).get(chips)
      if grid and (not chip.megacore or int(size) % 2 == 0):
        return Slice(name, chip, f'{TOPOLOGY_PREFIX[gen]}:{grid}', chips)
  raise UserError(
    f'unknown TPU topology {name!r}; known: {", ".join(known_names())}, or a raw topology such '
    "as 'v4:2x2x4' or 'v5e:8x8'"
  )


NO_LIBTPU = (
  "gaternet compile needs the TPU compiler: pip install -e '.[tpu]' (libtpu; in its own "
  'environment, never needed for anything else)'
)


def topology_devices(tpu: Slice) -> list:
  """The slice's TPU device descriptions (every host's), from libtpu's topology API."""
  if importlib.util.find_spec('libtpu') is None:
    raise UserError(NO_LIBTPU)
  try:
    from jax.experimental import topologies  # noqa: PLC0415

    topology = topologies.get_topology_desc(
      platform='tpu',
      topology_name=tpu.topology,
      chip_config_name=tpu.chip_config,
      chips_per_host_bounds=(1, 1, 1) if tpu.devices == 1 else (2, 2, 1),
      num_slices=1,
    )
  except Exception as e:  # noqa: BLE001 - no plugin raises several types, by jax version
    if 'tpu' in str(e).lower() and ('not installed' in str(e) or 'plugin' in str(e).lower()):
      raise UserError(NO_LIBTPU) from None
    raise UserError(f'cannot build TPU topology {tpu.topology}: {str(e).splitlines()[0]}') from None
  return list(topology.devices)


# Training examples of the datasets a config can name without reading them.
NUM_TRAIN = {'imagenet2012': 1_281_167, 'cifar10': 50_000, 'cifar100': 50_000, 'default': 1_500}


def dataset_info(config) -> DatasetInfo:
  """The DatasetInfo a launch would see, without the data (the image folder's is read)."""
  name = config.data.name
  if name not in NUM_TRAIN:
    from gaternet_jax import data  # noqa: PLC0415 - an image folder must be read

    return data.load_dataset(config.data).info
  num_classes, shape = describe.dataset_spec(config.data)
  train = NUM_TRAIN[name] - int(config.data.holdout)
  return DatasetInfo(
    name=name,
    num_classes=num_classes,
    image_shape=tuple(shape),
    mean=(127.0,) * shape[-1],
    std=(64.0,) * shape[-1],
    num_train=train,
    split_sizes={config.data.eval_split: 1},
    in_memory=name != 'imagenet2012',
  )


def _batch(setup: steps.Setup, size: int) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (size, *setup.info.image_shape)
  sharding = setup.data_sharding
  batch = {
    'image': jax.ShapeDtypeStruct(shape, np.uint8, sharding=sharding),
    'label': jax.ShapeDtypeStruct((size,), np.int32, sharding=sharding),
  }
  return batch


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {k: float(cost.get(k, 0.0)) for k in ('flops', 'bytes accessed')}


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = {
    'argument_bytes': int(m.argument_size_in_bytes),
    'output_bytes': int(m.output_size_in_bytes),
    'alias_bytes': int(m.alias_size_in_bytes),
    'temp_bytes': int(m.temp_size_in_bytes),
    'code_bytes': int(m.generated_code_size_in_bytes),
  }
  # Donated state: outputs that alias arguments take no memory of their own.
  out['peak_bytes'] = (
    out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] + out['temp_bytes']
  )
  return out


def custom_calls(compiled) -> list[str]:
  """Custom-call targets in the compiled program (none of ours may reach a TPU)."""
  text = compiled.as_text()
  return sorted(set(part.split('"')[0] for part in text.split('custom_call_target="')[1:]))


def compile_for(config, topology: str) -> dict[str, Any]:
  """Compiles `config`'s training and evaluation steps for a TPU slice; what the compiler says."""
  tpu = parse_slice(topology)
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % tpu.devices:
      raise UserError(
        f'{field} {config[field]} is not a multiple of the {tpu.devices} devices of {tpu.name}; '
        f'use a multiple (e.g. --config.{field}={layers.ceil_div(config[field], tpu.devices) * tpu.devices})'
      )
  devices = topology_devices(tpu)
  mesh = Mesh(np.asarray(devices), ('data',))
  info = dataset_info(config)
  setup = steps.build(config, info, mesh=mesh)
  train, evaluate, _ = steps.compile_steps(setup)
  key = jax.ShapeDtypeStruct(
    (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=setup.replicated
  )
  started = time.perf_counter()
  compiled = train.lower(setup.abstract_state, _batch(setup, config.batch_size), key).compile()
  train_s = time.perf_counter() - started
  threshold = jax.ShapeDtypeStruct((), np.float32, sharding=setup.replicated)
  batch = _batch(setup, config.eval_batch_size)
  batch['mask'] = jax.ShapeDtypeStruct(
    (config.eval_batch_size,), np.float32, sharding=setup.data_sharding
  )
  compiled_eval = evaluate.lower(setup.abstract_state, batch, threshold).compile()
  memory, cost = _memory(compiled), _cost(compiled)
  chip = tpu.chip
  compute_s = cost['flops'] / chip.peak_bf16_flops
  memory_s = cost['bytes accessed'] / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  images_per_s = config.batch_size / step_s if step_s else float('inf')
  stats = describe.describe(config, num_classes=info.num_classes, image_shape=info.image_shape)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state))
  result = {
    'config': config.name,
    'variant': configs.variant_of(config),
    'topology': tpu.name,
    'raw_topology': tpu.topology,
    'chip': chip.generation,
    'devices': tpu.devices,
    'hosts': len({d.process_index for d in devices}),
    'batch_size': config.batch_size,
    'per_chip_batch': config.batch_size // tpu.devices,
    'half_precision': bool(config.half_precision),
    'compile_s': round(train_s, 2),
    'state_bytes': int(state_bytes),
    'batch_bytes_per_chip': int(
      (config.batch_size // tpu.devices) * (math.prod(info.image_shape) + 4)
    ),
    **memory,
    'eval_peak_bytes': _memory(compiled_eval)['peak_bytes'],
    'hbm_bytes': chip.hbm_bytes,
    'flops_per_chip': cost['flops'],
    'bytes_accessed_per_chip': cost['bytes accessed'],
    'flops_per_image': cost['flops'] * tpu.devices / config.batch_size,
    'macs_per_image': stats['backbone_macs'] + stats['gater_macs'],
    'projected_step_s': step_s,
    'bound': 'compute' if compute_s >= memory_s else 'memory',
    'projected_images_per_s': images_per_s,
    'projected_epoch_s': info.num_train / images_per_s,
    'custom_calls': custom_calls(compiled),
  }
  result['fits'] = max(result['peak_bytes'], result['eval_peak_bytes']) <= chip.hbm_bytes
  return result


def check_fits(result: dict[str, Any]) -> None:
  """UserError with the numbers when the step does not fit in a chip's HBM."""
  if result['fits']:
    return
  peak = max(result['peak_bytes'], result['eval_peak_bytes'])
  raise UserError(
    f'{result["config"]} ({result["variant"]}) does not fit a {result["chip"]} chip of '
    f'{result["topology"]}: {peak / GIB:.1f} GiB at its peak (state {result["state_bytes"] / GIB:.2f}'
    f' GiB, temporaries {result["temp_bytes"] / GIB:.1f} GiB) against {result["hbm_bytes"] / GIB:.0f}'
    f' GiB of HBM; lower --config.batch_size (now {result["batch_size"]}, '
    f'{result["per_chip_batch"]} per chip) or set --config.half_precision=True'
  )


def format_text(result: dict[str, Any]) -> str:
  g = GIB
  lines = [
    f'{result["config"]} ({result["variant"]}) on {result["topology"]} ({result["raw_topology"]}:'
    f' {result["devices"]} {result["chip"]} chips, {result["hosts"]} hosts), global batch '
    f'{result["batch_size"]} ({result["per_chip_batch"]} per chip), '
    f'{"bfloat16" if result["half_precision"] else "float32"}; compiled in {result["compile_s"]} s',
    f'  per chip: state {result["state_bytes"] / g:.2f} GiB, batch {result["batch_bytes_per_chip"] / 2**20:.1f}'
    f' MiB, temporaries {result["temp_bytes"] / g:.2f} GiB, peak {result["peak_bytes"] / g:.2f} GiB '
    f'(evaluation {result["eval_peak_bytes"] / g:.2f}) of {result["hbm_bytes"] / g:.0f} GiB HBM',
    f'  per step and chip: {result["flops_per_chip"] / 1e12:.2f} TFLOP, '
    f'{result["bytes_accessed_per_chip"] / 1e9:.2f} GB accessed; per image '
    f'{result["flops_per_image"] / 1e9:.2f} GFLOP ({result["flops_per_image"] / result["macs_per_image"]:.1f}'
    f' x the {result["macs_per_image"] / 1e9:.2f} GMACs of a forward pass)',
    f'  projected (roofline, {result["bound"]}-bound; a compiler estimate, not a measurement): '
    f'{result["projected_step_s"] * 1e3:.1f} ms/step, {result["projected_images_per_s"]:,.0f} '
    f'images/s, {result["projected_epoch_s"] / 60:.1f} min/epoch',
  ]
  return '\n'.join(lines)
