"""How training and evaluation reach the devices: many steps per dispatch, whole splits per call.

A small model on an accelerator is launch-bound: one Python dispatch per step (plus one for the
batch) costs more than the step. For device-resident data (CIFAR, the embedded default, any
in-memory ImageFolder) one jitted call therefore runs up to `steps_per_dispatch` training steps in
a `lax.fori_loop`, drawing each batch on the device from the step number exactly as a single step
does, and an evaluation scores a whole split in one call (`lax.scan` over its padded batches,
kept on the device between evaluations). Streamed data (ImageNet through tf.data) runs one step
per call with its next batches already transferred (`prefetch`).

The number of steps per call is dynamic (a traced loop bound), so every chunk length up to the
maximum shares one compiled program: the loop cuts chunks at log, eval and checkpoint steps and
those stay exactly where the config puts them.

On the CPU the defaults are one step per call and one call per evaluation batch, without loops:
with XLA's own convolutions a ResNet-20 step ran ~45x slower inside a while loop than as a plain
call; with the native convolutions (models/native_conv.py) a loop of 8 steps is no longer slow but
still ~10% slower per step than single calls (measured on the 2-core development machine), and a
step takes far longer than its dispatch anyway.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gaternet_jax import cpu
from gaternet_jax.data import feed
from gaternet_jax.errors import UserError
from gaternet_jax.training import steps

# Steps per dispatch when `config.steps_per_dispatch` is None. On GPU/TPU a ResNet-20 step takes
# less time than launching it, so a chunk amortises the launch over many steps; the loop still
# cuts chunks at every log/eval/checkpoint step. On the CPU a step takes ~0.14 s, dispatch is
# negligible, and steps inside a loop ran slower there (see the module docstring).
ACCELERATOR_STEPS_PER_DISPATCH = 100
CPU_STEPS_PER_DISPATCH = 1
# Streamed batches transferred ahead of the step that consumes them.
PREFETCH_BATCHES = 2
# Batches a host loop of one-dispatch-per-batch calls may run ahead of the devices (`InFlight`).
# On several processes with 2 local devices each, XLA:CPU (jaxlib 0.10.2) deadlocked when the
# host let small multi-device programs pile up unfinished: one device's launch waited on the CPU
# client's per-device limit of in-flight computations while the other devices waited for it
# inside an all-reduce (CI's 2 x 2-device procedure test, in its per-batch evaluation). With 300
# tiny sum-and-add dispatches on 2 processes x 2 devices, the old evaluation loop (6 programs a
# batch, no wait) hung in every run; a window of 8 batches at 6 programs still hung, while 4
# batches at 2 programs never did (6 of 6; the development machine).
MAX_BATCHES_IN_FLIGHT = 4


class InFlight:
  """Keeps a host loop at most `limit` dispatches ahead of the devices (MAX_BATCHES_IN_FLIGHT).

  Call it with each dispatch's outputs; once more than `limit` are unfinished it waits for the
  oldest. Outputs that depend on every earlier dispatch (a running total) bound them all.
  """

  def __init__(self, limit: int = MAX_BATCHES_IN_FLIGHT):
    if limit < 1:
      raise ValueError(f'at least one dispatch must be allowed in flight, got {limit}')
    self.limit = limit
    self._pending: collections.deque = collections.deque()

  def __call__(self, outputs):
    self._pending.append(outputs)
    if len(self._pending) > self.limit:
      jax.block_until_ready(self._pending.popleft())
    return outputs


def loops_on_device(platform: str | None = None) -> bool:
  """Whether training and evaluation run as loops inside one call by default (not on the CPU)."""
  return (platform or jax.default_backend()) != 'cpu'


def steps_per_dispatch(config, info, platform: str | None = None) -> int:
  """The maximum steps per jitted call: the config's, else the platform's default; 1 if streamed."""
  if not info.in_memory:
    return 1  # one host batch per call; `prefetch` keeps the device fed instead
  if config.steps_per_dispatch is not None:
    return int(config.steps_per_dispatch)
  return ACCELERATOR_STEPS_PER_DISPATCH if loops_on_device(platform) else CPU_STEPS_PER_DISPATCH


def prefetch(batches: Iterator[dict], size: int = PREFETCH_BATCHES) -> Iterator[dict]:
  """Keeps `size` global batches in flight: their host-to-device copies overlap the steps."""
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class TrainDispatch:
  """`(state, step, n) -> (state, metrics)`: advances training by `n <= max_steps` steps.

  `step` is `state.step` (known on the host without waiting for the state); with resident data
  it picks the epochs whose example orders the chunk gets.

  `metrics` maps each train-step metric to an array whose first `n` entries are the values of
  those steps, in order (entries past `n` are unused): the host reads them only when it logs or
  checks for a non-finite loss, so nothing in the loop waits on the device.
  """

  def __init__(
    self,
    setup: steps.Setup,
    dataset,
    *,
    start_step: int,
    seed: int,
    data_key: jax.Array,
    key: jax.Array,
  ):
    config = setup.config
    self.key = key
    self.max_steps = steps_per_dispatch(config, dataset.info)
    if self.max_steps < 1:
      raise UserError(f'steps_per_dispatch must be at least 1, got {self.max_steps}')
    state_sh = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
    if dataset.info.in_memory:
      images, labels = dataset.train_arrays()
      self.resident = feed.ResidentTrainData(
        images,
        labels,
        num_train=dataset.info.num_train,
        batch_size=config.batch_size,
        sharding=setup.data_sharding,
        key=data_key,
      )
      # The most epochs a chunk of max_steps steps can touch (1 for a single step; one starting
      # at an epoch's last step reaches (max_steps - 2) // steps_per_epoch + 1 more). Their
      # example orders are drawn outside the chunk, once per epoch, not in every step.
      self.chunk_epochs = (self.max_steps - 2) // self.resident.steps_per_epoch + 2
      one_step = functools.partial(resident_step, setup=setup, resident=self.resident)
      if self.max_steps == 1:
        # No loop: with XLA's own convolutions XLA:CPU ran the step ~45x slower inside a while
        # loop (4.7 vs 218 images/s, ResNet-20, batch 128, the 2-core development CPU; ~10%
        # slower with the native ones), so one step per call is a plain call; the batch is still
        # drawn inside it (one dispatch per step, not two).
        chunk = functools.partial(single_step_chunk, one_step=one_step)
      else:
        # The step is its own jitted function so that its trace is made once and reused: the
        # chunk traces it for its metrics' shapes and again as the loop's body.
        chunk = functools.partial(loop_chunk, one_step=jax.jit(one_step), size=self.max_steps)
      self._chunk = jax.jit(
        chunk,
        in_shardings=(
          state_sh,
          setup.data_sharding,
          setup.data_sharding,
          self.resident.orders_sharding,
          *(setup.replicated,) * 3,
        ),
        out_shardings=(state_sh, setup.replicated),
        donate_argnums=(0,),
        compiler_options=cpu.compiler_options(steps.platform(setup), 'train'),
      )
    else:
      self.resident = None
      self._step = steps.compile_steps(setup)[0]
      local_batch = config.batch_size // jax.process_count()
      host_batches = dataset.train_iterator(local_batch, seed=seed, start_step=start_step)
      self._batches = prefetch(feed.to_global(b, setup.data_sharding) for b in host_batches)

  def lower(self, state: steps.TrainState):
    """The traced (not yet compiled) dispatch of resident data, e.g. to time its compilation."""
    if self.resident is None:
      raise TypeError('lower() is for device-resident data; streamed data runs steps.train_step')
    r = self.resident
    return self._chunk.lower(state, r.images, r.labels, *self._orders(0), self.key, jnp.int32(1))

  def _orders(self, step: int) -> tuple[jax.Array, jax.Array]:
    """(orders, first epoch) of the chunk starting at `step`: the epochs it can touch."""
    first_epoch = step // self.resident.steps_per_epoch
    return self.resident.orders(first_epoch, self.chunk_epochs), jnp.int32(first_epoch)

  def __call__(self, state: steps.TrainState, step: int, n: int):
    if not 1 <= n <= self.max_steps:
      raise ValueError(f'a dispatch runs 1 to {self.max_steps} steps, asked for {n}')
    if self.resident is None:
      state, metrics = self._step(state, next(self._batches), self.key)
      return state, jax.tree.map(lambda x: x[None], metrics)
    r = self.resident
    orders, first_epoch = self._orders(step)
    return self._chunk(state, r.images, r.labels, orders, first_epoch, self.key, jnp.int32(n))


def resident_step(state, images, labels, orders, first_epoch, key, hyper=None, *, setup, resident):
  """One training step on the resident batch of step `state.step` (`step` of the dispatch);
  `hyper`: a population member's traced values (`steps.train_step`)."""
  batch = resident.sample(images, labels, orders, first_epoch, state.step)
  batch = jax.lax.with_sharding_constraint(batch, setup.data_sharding)
  return steps.train_step(state, batch, key, setup=setup, hyper=hyper)


def single_step_chunk(state, images, labels, orders, first_epoch, key, num_steps, *, one_step):
  """A chunk of exactly one step, without a loop; metrics as length-1 arrays."""
  del num_steps  # always 1
  state, metrics = one_step(state, images, labels, orders, first_epoch, key)
  return state, jax.tree.map(lambda m: m[None], metrics)


def loop_chunk(state, images, labels, orders, first_epoch, key, num_steps, *, one_step, size):
  """`num_steps` (traced, <= size) train steps in one loop; metrics in `size`-long arrays."""
  args = (images, labels, orders, first_epoch, key)
  shapes = jax.eval_shape(one_step, state, *args)[1]
  buffers = jax.tree.map(lambda s: jnp.zeros((size, *s.shape), s.dtype), shapes)

  def body(i, carry):
    state, buffers = carry
    state, metrics = one_step(state, *args)
    return state, jax.tree.map(lambda b, m: b.at[i].set(m), buffers, metrics)

  return jax.lax.fori_loop(0, num_steps, body, (state, buffers))


class Evaluator:
  """`(state, split) -> metrics`: top-1/top-5 error, loss and gate density over a whole split.

  With `loop` (the default off the CPU) and device-resident data, the split's padded batches are
  placed on the devices once and scored in one call (`lax.scan`). Otherwise one call per batch:
  streamed data, and the CPU, where XLA runs convolutions inside a loop far slower.
  """

  def __init__(self, setup: steps.Setup, dataset, *, loop: bool | None = None):
    self.setup, self.dataset = setup, dataset
    self.loop = (loops_on_device() if loop is None else loop) and dataset.info.in_memory
    self._resident: dict[str, dict[str, jax.Array]] = {}
    state_sh = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
    if self.loop:
      self._stacked = NamedSharding(setup.mesh, P(None, 'data'))
      eval_one = jax.jit(functools.partial(steps.eval_step, setup=setup))  # traced once
      self._split_fn = jax.jit(
        functools.partial(_eval_split, eval_one=eval_one),
        in_shardings=(state_sh, self._stacked, setup.replicated),
        out_shardings=setup.replicated,
      )
    else:
      self._batch_fn = steps.compile_steps(setup)[1]
      # One dispatch adds every count (not one per count): fewer programs in flight per batch.
      self._add = jax.jit(
        lambda totals, sums: jax.tree.map(jnp.add, totals, sums), out_shardings=setup.replicated
      )

  def __call__(
    self, state: steps.TrainState, split: str, gate_threshold: float = 0.0
  ) -> dict[str, float]:
    return summarize(self.totals(state, split, gate_threshold))

  def totals(
    self, state: steps.TrainState, split: str, gate_threshold: float = 0.0
  ) -> dict[str, np.ndarray]:
    """The summed `steps.eval_step` counts over `split`, on the host (per-gate `gate_counts`
    included), with gates 1(g' > gate_threshold)."""
    threshold = np.float32(gate_threshold)  # a host value: every process passes the same
    if self.loop:
      if split not in self._resident:
        self._resident[split] = self._place(list(self._host_batches(split)))
      totals = self._split_fn(state, self._resident[split], threshold)
    else:
      totals: dict[str, Any] = {}
      in_flight = InFlight()
      for batch in self._host_batches(split):
        sums = self._batch_fn(state, feed.to_global(batch, self.setup.data_sharding), threshold)
        # The running totals depend on every batch so far: waiting on old ones bounds them all.
        totals = in_flight(sums if not totals else self._add(totals, sums))
    return jax.device_get(totals)

  def _host_batches(self, split: str):
    local_batch = self.setup.config.eval_batch_size // jax.process_count()
    return self.dataset.eval_iterator(split, local_batch)

  def _place(self, batches: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """This process's batches as one global (num_batches, global_batch, ...) array per key."""
    out = {}
    for k in batches[0]:
      local = np.stack([b[k] for b in batches])
      shape = (local.shape[0], self.setup.config.eval_batch_size, *local.shape[2:])
      out[k] = jax.make_array_from_process_local_data(self._stacked, local, shape)
    return out


def _eval_split(state, batches, gate_threshold, *, eval_one):
  """The summed `eval_step` counts over a stack of batches, in one loop."""

  def body(totals, batch):
    return jax.tree.map(jnp.add, totals, eval_one(state, batch, gate_threshold)), None

  first = jax.tree.map(lambda x: x[0], batches)
  shapes = jax.eval_shape(eval_one, state, first, gate_threshold)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  totals, _ = jax.lax.scan(body, zeros, batches)
  return totals


def summarize(totals: dict[str, Any]) -> dict[str, float]:
  """Error rates and means from the summed counts of `steps.eval_step`."""
  gate_counts = totals.get('gate_counts')
  totals = {k: float(v) for k, v in totals.items() if k != 'gate_counts'}
  count = max(totals.get('count', 0.0), 1.0)
  result = {
    'top1_error': 100.0 * (1.0 - totals['top1_correct'] / count),
    'top5_error': 100.0 * (1.0 - totals['top5_correct'] / count),
    'loss': totals['loss'] / count,
    'examples': int(totals['count']),
  }
  if gate_counts is not None:
    result['gate_density'] = float(np.sum(gate_counts, dtype=np.float64)) / (
      count * max(len(gate_counts), 1)
    )
  return result


def first_non_finite(finite: Any, n: int) -> int | None:
  """Index of the first step of a chunk whose loss or update was not finite, or None."""
  flags = np.asarray(finite)[:n]
  return None if flags.all() else int(np.argmin(flags))
