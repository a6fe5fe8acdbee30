"""Training and evaluation: one jitted, data-parallel step over a mesh of every device.

Parameters, batch statistics and optimizer state are replicated; every batch is sharded over the
mesh's `data` axis, so `jax.jit` with explicit shardings turns the step into data-parallel SPMD
(gradients are all-reduced by XLA). This is the JAX Training Cookbook's recipe; raw `pmap` is in
maintenance mode. On several hosts each process feeds only its part of each global batch
(`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gaternet_jax import checkpoints, losses, metrics_io, models
from gaternet_jax import data as data_lib
from gaternet_jax.data import augment
from gaternet_jax.errors import NonFiniteLossError, UserError


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds; the data position is `step` (the input pipelines are
  deterministic functions of the step)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Plan:
  """Values derived from a config and the dataset: never stored in the config."""

  steps_per_epoch: int
  total_steps: int
  eval_every_steps: int
  learning_rate: float  # peak, after linear batch scaling


def make_plan(
  config: ml_collections.ConfigDict, num_train: int, num_epochs: float, learning_rate: float
) -> Plan:
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise UserError(
      f'batch_size {config.batch_size} is larger than the {num_train} training examples'
    )
  total = max(1, math.ceil(num_epochs * steps_per_epoch))
  if config.max_steps is not None:
    total = min(total, config.max_steps)
  eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
  peak = learning_rate * config.batch_size / config.optimizer.base_batch_size
  return Plan(steps_per_epoch, total, eval_every, peak)


def make_mesh() -> Mesh:
  """A 1-D mesh named `data` over every device of every process."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def learning_rate_schedule(config: ml_collections.ConfigDict, plan: Plan) -> optax.Schedule:
  s = config.schedule
  warmup = min(round(s.warmup_epochs * plan.steps_per_epoch), plan.total_steps - 1)
  decay_steps = max(1, plan.total_steps - warmup)
  if s.name == 'cosine':
    main = optax.cosine_decay_schedule(plan.learning_rate, decay_steps)
  elif s.name == 'step':
    boundaries = {
      max(1, round(b * plan.total_steps) - warmup): s.decay_factor for b in s.boundaries
    }
    main = optax.piecewise_constant_schedule(plan.learning_rate, boundaries)
  elif s.name == 'constant':
    main = optax.constant_schedule(plan.learning_rate)
  else:
    raise UserError(f"unknown schedule.name {s.name!r}; choose 'step', 'cosine' or 'constant'")
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(0.0, plan.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  o = config.optimizer
  return optax.chain(
    # Coupled weight decay, i.e. an L2 term on every parameter, as in the ResNet recipes.
    optax.add_decayed_weights(o.weight_decay),
    optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov),
  )


def compute_dtype(config) -> Any:
  return jnp.bfloat16 if config.half_precision else jnp.float32


@dataclasses.dataclass
class Setup:
  """The model, mesh, optimizer and compiled steps of one run."""

  config: ml_collections.ConfigDict
  info: Any
  model: Any
  mesh: Mesh
  plan: Plan
  tx: Any
  schedule: optax.Schedule
  abstract_state: TrainState
  replicated: NamedSharding
  data_sharding: NamedSharding


def build(
  config: ml_collections.ConfigDict,
  info,
  *,
  num_epochs: float | None = None,
  learning_rate: float | None = None,
  mesh: Mesh | None = None,
) -> Setup:
  """Model, optimizer and abstract state for `config` on dataset `info`."""
  mesh = mesh or make_mesh()
  for field in (
    'batch_size',
    'eval_batch_size',
    'log_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
  ):
    if config[field] < 1:
      raise UserError(f'{field} must be at least 1, got {config[field]}')
  if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
    raise UserError(
      f'batch_size {config.batch_size} and eval_batch_size '
      f'{config.eval_batch_size} must be multiples of the {mesh.size} devices'
    )
  model = models.create_model(
    config, num_classes=info.num_classes, image_shape=info.image_shape, dtype=compute_dtype(config)
  )
  plan = make_plan(
    config,
    info.num_train,
    config.schedule.num_epochs if num_epochs is None else num_epochs,
    config.optimizer.learning_rate if learning_rate is None else learning_rate,
  )
  schedule = learning_rate_schedule(config, plan)
  tx = make_optimizer(config, schedule)
  replicated = NamedSharding(mesh, P())
  abstract_state = jax.eval_shape(
    functools.partial(init_state, model=model, tx=tx, image_shape=info.image_shape),
    jax.random.key(0),
  )
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state
  )
  return Setup(
    config,
    info,
    model,
    mesh,
    plan,
    tx,
    schedule,
    abstract_state,
    replicated,
    NamedSharding(mesh, P('data')),
  )


def init_state(key: jax.Array, *, model, tx, image_shape) -> TrainState:
  params_key, gates_key = jax.random.split(key)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({'params': params_key, 'gates': gates_key}, dummy, train=False)
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
  )


def create_state(setup: Setup, seed: int) -> TrainState:
  """Initialises the state directly into its (replicated) shardings."""
  init = functools.partial(
    init_state, model=setup.model, tx=setup.tx, image_shape=setup.info.image_shape
  )
  shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def preprocess(config, info, images: jax.Array, key: jax.Array | None) -> jax.Array:
  """uint8 images -> normalized compute-dtype inputs; pad-crop + flip when `key` is given."""
  if key is not None and config.data.augment and info.in_memory:
    images = augment.random_crop_flip(key, images, padding=config.data.crop_padding)
  return augment.normalize(images, info.mean, info.std, compute_dtype(config))


def train_step(
  state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *, setup: Setup
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; a pure function of (state, batch, key)."""
  config = setup.config
  step_key = jax.random.fold_in(key, state.step)
  augment_key, gates_key = jax.random.split(step_key)
  x = preprocess(config, setup.info, batch['image'], augment_key)
  labels = batch['label']
  # Scheduled dropout on the gates (appendix B): the rate rises linearly from 0 to its final value.
  progress = state.step.astype(jnp.float32) / setup.plan.total_steps
  gate_dropout_rate = config.gater.dropout_rate * jnp.minimum(progress, 1.0)

  def loss_fn(params):
    (logits, aux), new_vars = setup.model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      x,
      train=True,
      gate_dropout_rate=gate_dropout_rate,
      rngs={'gates': gates_key},
      mutable=['batch_stats'],
    )
    ce = losses.cross_entropy(logits, labels)
    if 'gates' in aux:
      sparsity = losses.gate_l1(aux['gates'], config.gater.l1_weight)
      density = aux['density']
    else:
      sparsity = density = jnp.zeros((), jnp.float32)
    return ce + sparsity, (new_vars, logits, ce, sparsity, density)

  grads, (new_vars, logits, ce, sparsity, density) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(
    step=state.step + 1,
    params=params,
    batch_stats=new_vars.get('batch_stats', {}),
    opt_state=opt_state,
  )
  # Checked on the host before any checkpoint is written: a finite loss with non-finite updates
  # (possible in bfloat16) must not slip a diverged state into a checkpoint either.
  finite = jnp.isfinite(ce + sparsity) & jnp.isfinite(optax.global_norm(updates))
  metrics = {
    'finite': finite,
    'loss': ce + sparsity,
    'cross_entropy': ce,
    'sparsity': sparsity,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
    'gate_density': density,
    'learning_rate': setup.schedule(state.step),
  }
  return new_state, metrics


def _eval_forward(state: TrainState, batch: dict[str, jax.Array], setup: Setup):
  """(logits, aux) in evaluation mode: no augmentation, running BN statistics, hard gates."""
  x = preprocess(setup.config, setup.info, batch['image'], None)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return setup.model.apply(variables, x, train=False)


def eval_step(
  state: TrainState, batch: dict[str, jax.Array], *, setup: Setup
) -> dict[str, jax.Array]:
  """Sums over the masked-in examples of one eval batch (padding rows have mask 0)."""
  logits, aux = _eval_forward(state, batch, setup)
  labels, mask = batch['label'], batch['mask']
  per_example_ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  sums = {
    'count': jnp.sum(mask),
    'loss': jnp.sum(per_example_ce * mask),
    'top1_correct': jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
    'top5_correct': jnp.sum(losses.topk_correct(logits, labels, 5) * mask),
  }
  if 'gates' in aux:
    sums['gates_on'] = jnp.sum(jnp.mean(aux['gates'], axis=-1) * mask)
  return sums


def predict_step(
  state: TrainState, batch: dict[str, jax.Array], *, setup: Setup
) -> dict[str, jax.Array]:
  """Evaluation-mode logits and binary gates of one batch (for analysis)."""
  logits, aux = _eval_forward(state, batch, setup)
  out = {'logits': logits}
  if 'gates' in aux:
    out['gates'] = aux['gates'] > 0.5
  return out


def compile_steps(setup: Setup):
  """The jitted train/eval/predict steps with explicit shardings (state donated in training)."""
  state_sh = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
  data_sh, rep = setup.data_sharding, setup.replicated
  train = jax.jit(
    functools.partial(train_step, setup=setup),
    in_shardings=(state_sh, data_sh, rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )
  evaluate = jax.jit(
    functools.partial(eval_step, setup=setup), in_shardings=(state_sh, data_sh), out_shardings=rep
  )
  predict = jax.jit(
    functools.partial(predict_step, setup=setup),
    in_shardings=(state_sh, data_sh),
    out_shardings=data_sh,
  )
  return train, evaluate, predict


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global batch from this process's part of it."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class ResidentTrainData:
  """A small training set kept on the devices as uint8; batches are drawn inside a jitted function.

  The set is split into one equal shard per device (each process provides its own devices' part,
  so each host holds only its share). Every epoch each shard is permuted with a key derived from
  (key, epoch, shard), and step `s` takes the `s % steps_per_epoch`-th slice of each shard's
  permutation: the batch is a pure function of the step, so resuming needs only the step.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, setup: Setup, key: jax.Array):
    mesh = setup.mesh
    num_devices = mesh.size
    local_devices = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    self.per_device = setup.info.num_train // num_devices
    self.device_batch = setup.config.batch_size // num_devices
    if self.per_device < self.device_batch:
      raise UserError(
        f'{setup.info.num_train} training examples are too few for batch_size '
        f'{setup.config.batch_size} on {num_devices} devices'
      )
    self.steps_per_epoch = self.per_device // self.device_batch
    keep = local_devices * self.per_device
    shape = images.shape[1:]
    local_images = images[:keep].reshape(local_devices, self.per_device, *shape)
    local_labels = labels[:keep].reshape(local_devices, self.per_device)
    sharding = setup.data_sharding
    self.images = jax.make_array_from_process_local_data(
      sharding, local_images, (num_devices, self.per_device, *shape)
    )
    self.labels = jax.make_array_from_process_local_data(
      sharding, local_labels, (num_devices, self.per_device)
    )
    self.key = key
    self._sample = jax.jit(self._sample_impl, out_shardings=setup.data_sharding)

  def _sample_impl(self, images, labels, key, step):
    epoch = step // self.steps_per_epoch
    offset = (step % self.steps_per_epoch) * self.device_batch
    epoch_key = jax.random.fold_in(key, epoch)

    def take(shard_images, shard_labels, shard_id):
      perm = jax.random.permutation(jax.random.fold_in(epoch_key, shard_id), self.per_device)
      idx = jax.lax.dynamic_slice_in_dim(perm, offset, self.device_batch)
      return shard_images[idx], shard_labels[idx]

    # The shard index is a global iota: each device gets its own shard's id, wherever its
    # process's devices sit in the mesh.
    shard_ids = jnp.arange(images.shape[0], dtype=jnp.int32)
    batch_images, batch_labels = jax.vmap(take)(images, labels, shard_ids)
    return {
      'image': batch_images.reshape(-1, *batch_images.shape[2:]),
      'label': batch_labels.reshape(-1),
    }

  def batch(self, step: int) -> dict[str, jax.Array]:
    return self._sample(self.images, self.labels, self.key, jnp.int32(step))


def train_batches(
  dataset, setup: Setup, start_step: int, seed: int, key: jax.Array
) -> Callable[[int], dict]:
  """step -> global training batch, for in-memory (device-resident) or streamed datasets.

  `key` orders device-resident data; `seed` seeds the tf.data pipeline of streamed datasets.
  """
  if dataset.info.in_memory:
    images, labels = dataset.train_arrays()
    resident = ResidentTrainData(images, labels, setup, key)
    return resident.batch
  local_batch = setup.config.batch_size // jax.process_count()
  iterator = dataset.train_iterator(local_batch, seed=seed, start_step=start_step)
  return lambda step: to_global(next(iterator), setup.data_sharding)


def evaluate(state: TrainState, dataset, split: str, setup: Setup, eval_fn) -> dict[str, float]:
  """Top-1/top-5 error, loss and gate density over every example of `split`."""
  local_batch = setup.config.eval_batch_size // jax.process_count()
  totals: dict[str, Any] = {}
  for batch in dataset.eval_iterator(split, local_batch):
    sums = eval_fn(state, to_global(batch, setup.data_sharding))
    totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals.get('count', 0.0), 1.0)
  result = {
    'top1_error': 100.0 * (1.0 - totals['top1_correct'] / count),
    'top5_error': 100.0 * (1.0 - totals['top5_correct'] / count),
    'loss': totals['loss'] / count,
    'examples': int(totals['count']),
  }
  if 'gates_on' in totals:
    result['gate_density'] = totals['gates_on'] / count
  return result


def write_results(workdir: str, results: dict[str, Any]) -> None:
  checkpoints.write_json(workdir, checkpoints.RESULTS_FILE, results)


PLAN_FILE = 'plan.json'


def check_resume_plan(workdir: str, setup: Setup, *, resuming: bool) -> None:
  """Stores the derived plan; on resume, refuses a dataset of another size.

  The config can match while the data do not (e.g. `data.data_dir` pointed at another copy):
  a different number of training examples would silently change steps per epoch, the total
  steps and the schedule. A different device count only changes the data order, so it is
  logged.
  """
  plan = {
    'num_train': setup.info.num_train,
    'steps_per_epoch': setup.plan.steps_per_epoch,
    'total_steps': setup.plan.total_steps,
    'devices': setup.mesh.size,
  }
  if resuming and checkpoints.exists(workdir, PLAN_FILE):
    stored = checkpoints.read_json(workdir, PLAN_FILE)
    if stored.get('num_train') != plan['num_train']:
      raise UserError(
        f'workdir {workdir!r} was trained on {stored.get("num_train")} training examples, '
        f'the data now has {plan["num_train"]}; resume with the same data or use a new --workdir'
      )
    if stored.get('devices') != plan['devices']:
      logging.warning(
        'Resuming on %d devices, trained on %d: the order of training examples changes.',
        plan['devices'],
        stored.get('devices'),
      )
  checkpoints.write_json(workdir, PLAN_FILE, plan)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains what `config` describes in `workdir` and returns the final eval metrics.

  A gated config with `procedure.pretrain` runs the paper's three stages (see procedure.py);
  anything else is one run.
  """
  from gaternet_jax import procedure  # noqa: PLC0415 - procedure imports this module

  if config.model.gated and config.procedure.pretrain:
    return procedure.run(config, workdir)
  return train_single(config, workdir)


def train_single(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stage: str | None = None,
  num_epochs: float | None = None,
  learning_rate: float | None = None,
  initialize: Callable[[TrainState, Setup], TrainState] | None = None,
) -> dict[str, Any]:
  """One run: resume or initialise, train with periodic eval and checkpoints, write results.

  Args:
    config: the run's config (stored as `workdir/config.json`; a resume must match it).
    workdir: where checkpoints, events and results go.
    stage: a label for logs and results (procedure stages).
    num_epochs, learning_rate: override the recipe's (procedure stages).
    initialize: applied to a freshly initialised state (never to a resumed one), e.g. to load
      pre-trained parameters.
  """
  started = time.time()
  checkpoints.ensure_writable(workdir)
  checkpoints.check_resume_config(config, workdir)
  dataset = data_lib.load_dataset(
    config.data, process_index=jax.process_index(), process_count=jax.process_count()
  )
  setup = build(config, dataset.info, num_epochs=num_epochs, learning_rate=learning_rate)
  plan = setup.plan
  checkpoints.save_config(config, workdir)
  manager = checkpoints.make_manager(workdir, keep=config.keep_checkpoints)
  start_step = manager.latest_step()
  check_resume_plan(workdir, setup, resuming=start_step is not None)
  if start_step is not None:
    state = checkpoints.restore(manager, start_step, setup.abstract_state, workdir)
    logging.info('Resumed %s from step %d.', workdir, start_step)
  else:
    state = create_state(setup, config.seed)
    if initialize is not None:
      state = initialize(state, setup)
    start_step = 0
  train_fn, eval_fn, _ = compile_steps(setup)
  # Separate streams for the data order and the step (augmentation, SemHash, gate dropout),
  # made inside jit so that they are global replicated arrays on every host.
  data_key, key = jax.jit(
    lambda: tuple(jax.random.split(jax.random.key(config.seed))),
    out_shardings=(setup.replicated, setup.replicated),
  )()
  get_batch = train_batches(dataset, setup, start_step, config.seed, data_key)

  writer = metrics_io.create_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(
      {
        k: v
        for k, v in checkpoints.flatten(config).items()
        if isinstance(v, (int, float, str, bool))
      }
    )
  report = metrics_io.create_progress(plan.total_steps, writer)
  logging.info(
    '%s: %d steps (%d per epoch), global batch %d on %d devices.',
    stage or 'train',
    plan.total_steps,
    plan.steps_per_epoch,
    config.batch_size,
    setup.mesh.size,
  )

  eval_metrics: dict[str, Any] = {}
  pending: list[dict[str, jax.Array]] = []
  previous = None  # (step, loss, finite) of the previous step, checked one step late
  step = start_step
  while step < plan.total_steps:
    state, metrics = train_fn(state, get_batch(step), key)
    step += 1
    if previous is not None:
      _check_finite(*previous)
    previous = (step, metrics['loss'], metrics.pop('finite'))
    pending.append(metrics)
    report(step)
    if step % config.log_every_steps == 0 or step == plan.total_steps:
      summary = {
        f'train/{k}': float(np.mean(v)) for k, v in jax.device_get(_stack(pending)).items()
      }
      writer.write_scalars(step, summary)
      pending = []
    is_last = step == plan.total_steps
    if step % plan.eval_every_steps == 0 or is_last:
      with report.timed('eval'):
        eval_metrics = evaluate(state, dataset, config.data.eval_split, setup, eval_fn)
      writer.write_scalars(step, {f'eval/{k}': v for k, v in eval_metrics.items()})
    if step % config.checkpoint_every_steps == 0 or is_last:
      _check_finite(*previous)  # never write a checkpoint of a diverged state
      manager.save(step, args=checkpoints.ocp.args.StandardSave(state))
  if previous is not None:
    _check_finite(*previous)
  manager.wait_until_finished()
  manager.close()
  if not eval_metrics:  # resumed a finished run: nothing trained, evaluate what is there
    eval_metrics = evaluate(state, dataset, config.data.eval_split, setup, eval_fn)
  writer.flush()
  writer.close()
  layout = models.gate_layout(config, setup.info.image_shape) if config.model.gated else []
  results = {
    'name': config.name,
    'variant': config.variant,
    'dataset': config.data.name,
    'backbone': config.model.backbone,
    'params': int(sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))),
    'gated_filters': sum(layer.filters for layer in layout),
    'stage': stage,
    'step': int(step),
    'total_steps': plan.total_steps,
    'wall_time_s': round(time.time() - started, 2),
    'split': config.data.eval_split,
    'eval': eval_metrics,
  }
  write_results(workdir, results)
  return results


def _stack(metrics: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  return {k: jnp.stack([m[k] for m in metrics]) for k in metrics[0]}


def _check_finite(step: int, loss: jax.Array, finite: jax.Array) -> None:
  if bool(finite):
    return
  value = float(loss)
  what = f'non-finite loss ({value})' if not math.isfinite(value) else 'non-finite gradients'
  raise NonFiniteLossError(
    f'{what} at step {step}; training stopped, the last checkpoint before it is kept'
  )
