"""The pure parts of training: plan, optimizer, state, and the jitted train/eval/predict steps.

Parameters, batch statistics and optimizer state are replicated; every batch is sharded over the
mesh's `data` axis, so `jax.jit` with explicit shardings turns each step into data-parallel SPMD
(gradients are all-reduced by XLA). This is the JAX Training Cookbook's recipe; raw `pmap` is in
maintenance mode. Nothing here touches files: `dispatch.py` dispatches these steps,
`loop.py` runs the loop, `procedure.py` the stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gaternet_jax import cpu, legacy, models, validation
from gaternet_jax.data import augment
from gaternet_jax.errors import UserError
from gaternet_jax.gating.local import MODULE_NAME as LOCAL_GATE_MODULE
from gaternet_jax.models import initialization
from gaternet_jax.training import losses


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


def learning_rate_schedule(
  config: ml_collections.ConfigDict, plan: Plan, peak: float | jax.Array | None = None
) -> optax.Schedule:
  """The config's schedule, peaking at `plan.learning_rate` (or `peak`, which may be traced: a
  population member's own learning rate)."""
  peak = plan.learning_rate if peak is None else peak
  s = config.schedule
  warmup = min(round(s.warmup_epochs * plan.steps_per_epoch), plan.total_steps - 1)
  decay_steps = max(1, plan.total_steps - warmup)
  if s.name == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps)
  elif s.name == 'step':
    boundaries = {
      max(1, round(b * plan.total_steps) - warmup): s.decay_factor for b in s.boundaries
    }
    main = optax.piecewise_constant_schedule(peak, boundaries)
  elif s.name == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f'schedule.name {s.name!r}')  # validation.RULES refuses it first
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(0.0, peak, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  o = config.optimizer
  return optax.chain(
    # Coupled weight decay, i.e. an L2 term on every parameter, as in the ResNet recipes; the
    # local gating modules only where `gating.module_weight_decay` says so.
    optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask(config)),
    optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov),
  )


def weight_decay_mask(config) -> Callable[[Any], Any] | None:
  """None (decay every parameter), or params -> a tree of bools, False for the parameters of the
  local gating modules (`<unit>/gate`) when the config exempts them."""
  if legacy.field(config, 'gating.module_weight_decay') or not models.is_local(config):
    return None

  def mask(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, 'key', None) == LOCAL_GATE_MODULE for k in path), params
    )

  return mask


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
  # The XLA:CPU speed-ups (gaternet_jax/cpu) while tracing the steps; off for a population
  # vmapped on the CPU, whose native convolutions have no batching rule.
  cpu_speedups: bool = True


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
  validation.validate_config(config)  # the field rules; what depends on the mesh is checked here
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
  params_key, gates_key, kernels_key = jax.random.split(key, 3)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = initialization.init_variables(
    model, kernels_key, {'params': params_key, 'gates': gates_key}, dummy, train=False
  )
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
  )


def platform(setup: Setup) -> str:
  """'cpu', 'gpu' or 'tpu': where the run's mesh is."""
  return setup.mesh.devices.flat[0].platform


def speedups(setup: Setup, *, training: bool):
  """The context a step of `setup` is traced in (`cpu.speedups`, unless the setup turns them off)."""
  if not setup.cpu_speedups:
    return contextlib.nullcontext()
  return cpu.speedups(platform(setup), training=training, mesh=setup.mesh)


def create_state(setup: Setup, key: jax.Array | int) -> TrainState:
  """Initialises the state directly into its (replicated) shardings, from a key or a seed."""
  init = functools.partial(
    init_state, model=setup.model, tx=setup.tx, image_shape=setup.info.image_shape
  )
  shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
  key = jax.random.key(key) if isinstance(key, int) else key
  lowered = jax.jit(init, out_shardings=shardings).lower(key)
  return lowered.compile(compiler_options=cpu.compiler_options(platform(setup), 'init'))(key)


def preprocess(config, info, images: jax.Array, key: jax.Array | None) -> jax.Array:
  """uint8 images -> normalized compute-dtype inputs; pad-crop + flip when `key` is given."""
  if key is not None and config.data.augment and info.in_memory:
    images = augment.random_crop_flip(key, images, padding=config.data.crop_padding)
  return augment.normalize(images, info.mean, info.std, compute_dtype(config))


def all_finite(tree) -> jax.Array:
  """True iff every element of every array in `tree` is finite (a bool scalar).

  One reduction over all leaves laid end to end, not one per leaf as `optax.global_norm` does:
  ResNet-164-Gated has 556 parameter arrays, and the per-leaf reductions were 555 more reduce
  instructions (505 more fusions) in its compiled train step, 1.7 s more of its cold XLA:CPU
  trace + compile (medians 19.2 vs 17.5 s; docs/performance.md). Exact, unlike a norm, which
  overflows to inf for huge but finite values.
  """
  leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.isfinite(jnp.concatenate(leaves)))


# The values a population member may hold as a traced number (`train_step`'s `hyper`), where a
# run alone has a Python constant from its config: the peak learning rate (after batch scaling)
# and the final gate-dropout rate; the gate-loss weights are `losses.WEIGHT_FIELDS`.
PEAK_LEARNING_RATE = 'peak_learning_rate'
GATE_DROPOUT_RATE = 'gater.dropout_rate'


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  setup: Setup,
  hyper: dict[str, jax.Array] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; a pure function of (state, batch, key).

  `hyper` (a population member's, `training/population.py`): traced values that replace the
  config's learning rate (PEAK_LEARNING_RATE), final gate-dropout rate (GATE_DROPOUT_RATE) and
  gate-loss weights (`losses.WEIGHT_FIELDS`); whether dropout is drawn at all stays the config's.
  """
  config = setup.config
  hyper = hyper or {}
  step_key = jax.random.fold_in(key, state.step)
  augment_key, gates_key = jax.random.split(step_key)
  x = preprocess(config, setup.info, batch['image'], augment_key)
  labels = batch['label']
  # Scheduled dropout on the gates (appendix B): the rate rises linearly from 0 to its final value
  # (a final rate of 0 stays a Python 0, so no dropout mask is drawn).
  gate_dropout_rate = 0.0
  if config.gater.dropout_rate:
    fraction = state.step.astype(jnp.float32) / setup.plan.total_steps
    final_rate = hyper.get(GATE_DROPOUT_RATE, config.gater.dropout_rate)
    gate_dropout_rate = final_rate * jnp.minimum(fraction, 1.0)

  def loss_fn(params):
    # XLA:CPU-only speed-ups (gaternet_jax/cpu); nothing on GPU or TPU.
    with speedups(setup, training=True):
      (logits, aux), new_vars = setup.model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        x,
        train=True,
        gate_dropout_rate=gate_dropout_rate,
        rngs={'gates': gates_key},
        mutable=['batch_stats'],
      )
    progress = losses.Progress(state.step, setup.plan.total_steps)
    loss, terms = losses.objective(logits, labels, aux, config, progress, weights=hyper)
    density = aux['density'] if 'density' in aux else jnp.zeros((), jnp.float32)
    return loss, (new_vars, logits, terms, density)

  (loss, (new_vars, logits, terms, density)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  tx, schedule = setup.tx, setup.schedule
  if PEAK_LEARNING_RATE in hyper:  # the same optimizer around a traced peak: same state layout
    schedule = learning_rate_schedule(config, setup.plan, peak=hyper[PEAK_LEARNING_RATE])
    tx = make_optimizer(config, schedule)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(
    step=state.step + 1,
    params=params,
    batch_stats=new_vars.get('batch_stats', {}),
    opt_state=opt_state,
  )
  # Checked on the host before any checkpoint is written: a finite loss with non-finite updates
  # (possible in bfloat16) must not slip a diverged state into a checkpoint either. The new
  # parameters are checked, not the updates: they are non-finite whenever an update is (and when
  # a finite update overflows its parameter), and they are outputs anyway, so the check reads
  # them where the updates would need one more kernel per parameter array to be materialised
  # (ResNet-164-Gated: 556 fusions fewer, docs/performance.md).
  finite = jnp.isfinite(loss) & all_finite(params)
  metrics = {
    'finite': finite,
    'loss': loss,
    **terms,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
    'gate_density': density,
    'learning_rate': schedule(state.step),
  }
  return new_state, metrics


def _eval_forward(state: TrainState, batch: dict[str, jax.Array], setup: Setup, gate_threshold=0.0):
  """(logits, aux) in evaluation mode: no augmentation, running BN statistics, hard gates
  1(g' > gate_threshold)."""
  x = preprocess(setup.config, setup.info, batch['image'], None)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  with speedups(setup, training=False):
    return setup.model.apply(variables, x, train=False, gate_threshold=gate_threshold)


def eval_step(
  state: TrainState, batch: dict[str, jax.Array], gate_threshold=0.0, *, setup: Setup
) -> dict[str, jax.Array]:
  """Sums over the masked-in examples of one eval batch (padding rows have mask 0).

  `gate_threshold` (a traced scalar: one compilation serves every threshold) moves the gates'
  decision point: 1(g' > T), T = 0 being the trained model. `gate_counts` counts, per gate, the
  examples it was on for (what the compute actually used is computed from).
  """
  logits, aux = _eval_forward(state, batch, setup, gate_threshold)
  labels, mask = batch['label'], batch['mask']
  per_example_ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  sums = {
    'count': jnp.sum(mask),
    'loss': jnp.sum(per_example_ce * mask),
    'top1_correct': jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
    'top5_correct': jnp.sum(losses.topk_correct(logits, labels, 5) * mask),
  }
  if 'gates' in aux:
    sums['gate_counts'] = jnp.sum(aux['gates'].astype(jnp.float32) * mask[:, None], axis=0)
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
    compiler_options=cpu.compiler_options(platform(setup), 'train'),
  )
  evaluate = jax.jit(
    functools.partial(eval_step, setup=setup),
    in_shardings=(state_sh, data_sh, rep),
    out_shardings=rep,
  )
  predict = jax.jit(
    functools.partial(predict_step, setup=setup),
    in_shardings=(state_sh, data_sh),
    out_shardings=data_sh,
  )
  return train, evaluate, predict
