"""Many steps per dispatch: same parameters, same data order, exact resume, non-finite stops."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_default

from gaternet_jax import data as data_lib
from gaternet_jax.cpu import flags as cpu_flags
from gaternet_jax.errors import Interrupted, NonFiniteLossError
from gaternet_jax.training import checkpoints, dispatch, procedure, restore, steps


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))]


def _assert_states_close(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


def _difference_per_change(a, b, start):
  """|a - b| over |a - start|, all parameters and batch statistics as one vector."""
  a, b, start = (np.concatenate([x.ravel() for x in _leaves(s)]) for s in (a, b, start))
  return np.linalg.norm(a - b) / np.linalg.norm(a - start)


def _train_8_steps(variant, k, data_seed=1):
  """8 steps from the same state and keys in chunks of k: (final state, per-step metrics)."""
  config = tiny_default(variant, steps_per_dispatch=k)
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  trainer = dispatch.TrainDispatch(
    setup, dataset, start_step=0, seed=0, data_key=jax.random.key(data_seed), key=jax.random.key(2)
  )
  state, per_step = steps.create_state(setup, 0), {}
  for start in range(0, 8, k):
    state, metrics = trainer(state, start, k)
    for name, values in metrics.items():
      per_step.setdefault(name, []).extend(np.asarray(values)[:k])
  return state, per_step


@pytest.mark.slow
def test_k_steps_per_dispatch_equal_k_single_steps():
  """8 steps as 2 chunks of 4 (a loop on the device) give the single steps' parameters.

  Within float tolerance: the loop body and the single step are compiled apart, so XLA fuses (and
  rounds) them differently (bitwise equal on an AVX2 host, ~1e-6 apart after 2 steps on an AVX-512
  one), and training this tiny model amplifies that: after 8 steps the difference is 0.1-0.3% of
  what the 8 steps changed (losses within 4e-4). The same steps on another data order land 16-19%
  away, so 3% lies 10x above the one and 5x below the other.
  """
  single, single_metrics = _train_8_steps('plain', 1)
  chunked, chunked_metrics = _train_8_steps('plain', 4)
  config = tiny_default('plain')
  start = steps.create_state(steps.build(config, data_lib.load_dataset(config.data).info), 0)
  assert int(chunked.step) == 8
  assert _difference_per_change(single, chunked, start) < 0.03
  np.testing.assert_allclose(single_metrics['loss'][:3], chunked_metrics['loss'][:3], rtol=1e-6)
  np.testing.assert_allclose(single_metrics['loss'], chunked_metrics['loss'], rtol=2e-3)
  # What the tolerance must catch: the same steps on another data order.
  other_data, _ = _train_8_steps('plain', 4, data_seed=3)
  assert _difference_per_change(single, other_data, start) > 0.1


@pytest.mark.slow
def test_gated_chunks_draw_each_steps_randomness():
  """SemHash noise, the alpha/beta choice and gate dropout come from the step number: the first
  step of a chunk run equals the single step exactly (later steps drift apart only by float
  rounding, which a hard gate near its threshold can amplify)."""
  _, single = _train_8_steps('gated', 1)
  _, chunked = _train_8_steps('gated', 4)
  for name in ('loss', 'gate_density', 'accuracy'):
    np.testing.assert_allclose(single[name][0], chunked[name][0], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(single['loss'], chunked['loss'], rtol=1e-2)


def _chunked(**overrides):
  """A plain tiny run of 12 steps in chunks of up to 4; checkpoints every 4 steps."""
  fields = dict(max_steps=12, steps_per_dispatch=4, checkpoint_every_steps=4, log_every_steps=4)
  return tiny_default('plain', **{**fields, **overrides})


class _Killed(Exception):
  """Stands for the process dying: nothing after it runs."""


def _final_state(workdir):
  return restore.load_state(workdir).state


@pytest.mark.slow
def test_resume_after_a_death_mid_chunk_matches_the_uninterrupted_run(tmp_path, monkeypatch):
  reference = str(tmp_path / 'reference')
  procedure.train_and_evaluate(_chunked(), reference)

  # The process dies inside the chunk of steps 5-8: its work is lost, checkpoint 4 is on disk.
  calls, dying = [], [True]
  real_call = dispatch.TrainDispatch.__call__

  def dying_call(self, state, step, n):
    calls.append((step, n))
    if step == 4 and dying[0]:
      raise _Killed('mid-chunk')
    return real_call(self, state, step, n)

  workdir = str(tmp_path / 'killed')
  monkeypatch.setattr(dispatch.TrainDispatch, '__call__', dying_call)
  with pytest.raises(_Killed):
    procedure.train_and_evaluate(_chunked(), workdir)
  assert calls == [(0, 4), (4, 4)] and checkpoints.steps(workdir) == [4]

  # Resumed with another number of steps per dispatch: the data position is the step, so the
  # run ends at the same step with the same parameters.
  calls.clear()
  dying[0] = False
  result = procedure.train_and_evaluate(_chunked(steps_per_dispatch=3), workdir)
  assert calls == [(4, 3), (7, 1), (8, 3), (11, 1)]
  assert result['step'] == 12
  _assert_states_close(_final_state(reference), _final_state(workdir))


@pytest.mark.slow
def test_sigterm_mid_chunk_stops_at_the_chunk_end_and_resumes_exactly(tmp_path, monkeypatch):
  reference = str(tmp_path / 'reference')
  procedure.train_and_evaluate(_chunked(checkpoint_every_steps=100), reference)
  real_call = dispatch.TrainDispatch.__call__

  def signalled_call(self, state, step, n):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while the chunk of steps 5-8 runs
    return real_call(self, state, step, n)

  workdir = str(tmp_path / 'stopped')
  monkeypatch.setattr(dispatch.TrainDispatch, '__call__', signalled_call)
  with pytest.raises(Interrupted, match='at step 8'):
    procedure.train_and_evaluate(_chunked(checkpoint_every_steps=100), workdir)
  assert checkpoints.steps(workdir) == [8]
  monkeypatch.setattr(dispatch.TrainDispatch, '__call__', real_call)
  assert procedure.train_and_evaluate(_chunked(checkpoint_every_steps=100), workdir)['step'] == 12
  _assert_states_close(_final_state(reference), _final_state(workdir))


def test_non_finite_loss_inside_a_chunk_stops_at_that_step(tmp_path, monkeypatch):
  """Step 6 (the 2nd of the chunk 5-8) goes non-finite: the error names it, checkpoint 4 stays."""
  real_step = steps.train_step

  def poisoned_step(state, batch, key, *, setup, **kwargs):
    new_state, metrics = real_step(state, batch, key, setup=setup, **kwargs)
    bad = state.step >= 5
    poison = jnp.where(bad, jnp.nan, 0.0)
    new_state = new_state.replace(params=jax.tree.map(lambda p: p + poison, new_state.params))
    return new_state, dict(metrics, loss=metrics['loss'] + poison, finite=metrics['finite'] & ~bad)

  monkeypatch.setattr(steps, 'train_step', poisoned_step)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(NonFiniteLossError, match=r'non-finite loss \(nan\) at step 6;'):
    procedure.train_and_evaluate(_chunked(), workdir)
  assert checkpoints.steps(workdir) == [4]
  state = _final_state(workdir)
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in _leaves(state))


def test_first_non_finite():
  assert dispatch.first_non_finite(np.array([True, True, False, False]), 2) is None
  assert dispatch.first_non_finite(np.array([True, False, True, False]), 4) == 1


def test_steps_per_dispatch_defaults():
  config = tiny_default('plain')
  resident = data_lib.load_dataset(config.data).info
  streamed = resident.__class__(**{**resident.__dict__, 'in_memory': False})
  assert dispatch.steps_per_dispatch(config, resident, 'cpu') == 1
  assert dispatch.steps_per_dispatch(config, resident, 'gpu') == 100
  assert dispatch.steps_per_dispatch(config, streamed, 'gpu') == 1
  config.steps_per_dispatch = 7
  assert dispatch.steps_per_dispatch(config, resident, 'cpu') == 7
  assert dispatch.steps_per_dispatch(config, streamed, 'cpu') == 1


def test_prefetch_keeps_order_and_yields_everything():
  produced = []

  def source():
    for i in range(5):
      produced.append(i)
      yield i

  stream = dispatch.prefetch(source(), size=2)
  assert next(stream) == 0 and produced == [0, 1, 2]  # two batches in flight beyond the first
  assert list(stream) == [1, 2, 3, 4]


def test_in_flight_waits_for_the_oldest_dispatch_beyond_its_limit(monkeypatch):
  """A host loop stays `limit` dispatches ahead of the devices: the (limit+1)-th waits for the
  first, and so on, oldest first; nothing waits before then."""
  waited = []
  monkeypatch.setattr(dispatch.jax, 'block_until_ready', waited.append)
  in_flight = dispatch.InFlight(limit=2)
  assert [in_flight(x) for x in 'ab'] == ['a', 'b'] and waited == []
  assert in_flight('c') == 'c' and waited == ['a']
  in_flight('d')
  assert waited == ['a', 'b']
  assert dispatch.InFlight().limit == dispatch.MAX_BATCHES_IN_FLIGHT
  with pytest.raises(ValueError, match='at least one'):
    dispatch.InFlight(limit=0)


@pytest.mark.slow
def test_only_the_training_programs_get_the_train_compiler_options(monkeypatch):
  """Both training paths (resident dispatch, streamed step) compile with them; evaluation not.

  An option XLA does not know makes a compile fail, which shows where the options go.
  """
  monkeypatch.setitem(cpu_flags.PROGRAM_OPTIONS, 'train', {'xla_no_such_option': 1})
  config = tiny_default('gated')
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  state = steps.create_state(setup, 0)
  key = jax.random.key(0)
  trainer = dispatch.TrainDispatch(setup, dataset, start_step=0, seed=0, data_key=key, key=key)
  with pytest.raises(Exception, match='xla_no_such_option'):
    trainer.lower(state).compile()
  train, evaluate, _ = steps.compile_steps(setup)
  images, labels = dataset.train_arrays()
  batch = {'image': jnp.asarray(images[:8]), 'label': jnp.asarray(labels[:8])}
  with pytest.raises(Exception, match='xla_no_such_option'):
    train.lower(state, batch, key).compile()
  evaluate.lower(state, dict(batch, mask=jnp.ones((8,))), jnp.float32(0)).compile()


def _resident_dispatch(**overrides):
  config = tiny_default('plain', **overrides)
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  key = jax.random.key(0)
  return dispatch.TrainDispatch(
    setup, dataset, start_step=0, seed=0, data_key=jax.random.key(7), key=key
  )


def test_resident_batches_are_each_epochs_shard_permutations_sliced():
  """Step s takes slice s % steps_per_epoch of each shard's permutation of epoch s // spe, drawn
  with fold_in(fold_in(data_key, epoch), shard) (the data order of every earlier run)."""
  r = _resident_dispatch().resident
  spe, b = r.steps_per_epoch, r.device_batch
  shard_labels = np.asarray(r.labels)
  for step in (0, 1, spe - 1, spe, 2 * spe + 3):
    epoch, offset = divmod(step, spe)
    expected = []
    for shard in range(r.images.shape[0]):
      key = jax.random.fold_in(jax.random.fold_in(r.key, epoch), shard)
      order = np.asarray(jax.random.permutation(key, r.per_device))
      expected.append(shard_labels[shard][order[offset * b : offset * b + b]])
    np.testing.assert_array_equal(np.asarray(r.batch(step)['label']), np.concatenate(expected))


@pytest.mark.parametrize('k', [1, 4, 40])
def test_a_chunks_orders_cover_every_step_it_can_run(k, monkeypatch):
  """Each chunk gets the orders of every epoch it can reach (here up to 3 epochs of 15 steps),
  drawn once per epoch (k = 1) or per chunk start's epoch, not per step."""
  dispatch = _resident_dispatch(steps_per_dispatch=k)
  r = dispatch.resident
  spe = r.steps_per_epoch
  assert dispatch.chunk_epochs == (k - 2) // spe + 2
  starts = range(0, 3 * spe + 2, k)
  expected = {s: np.asarray(r.batch(s)['label']) for s in range(starts[-1] + k)}
  drawn = []
  draw = r._epoch_orders
  monkeypatch.setattr(
    r, '_epoch_orders', lambda key, e, epochs: drawn.append(int(e)) or draw(key, e, epochs=epochs)
  )
  sample = jax.jit(r.sample)
  for start in starts:
    orders, first_epoch = dispatch._orders(start)
    for step in range(start, start + k):
      got = sample(r.images, r.labels, orders, first_epoch, jnp.int32(step))['label']
      np.testing.assert_array_equal(np.asarray(got), expected[step])
  assert drawn == sorted({s // spe for s in starts})  # once per first epoch, in order
