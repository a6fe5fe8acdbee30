"""Batch norm with staged sums: same values and gradients as Flax's, used by the CPU train step."""

import collections
import contextlib
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_setup_and_batch, train_step_calls

from gaternet_jax.cpu import flags as cpu_flags
from gaternet_jax.cpu import native_conv, staged_batch_norm
from gaternet_jax.models import layers
from gaternet_jax.training import steps

KEEP_BARRIERS = cpu_flags.KEEP_BARRIERS_FLAG


@pytest.mark.parametrize('rows', [1, 5, 16, 210, 4096])
def test_staged_sums_equal_plain_sums(rows):
  rng = np.random.default_rng(rows)
  a = rng.normal(size=(rows, 3)).astype(np.float32)
  b = rng.normal(size=(rows, 7)).astype(np.float32)
  sum_a, sum_b = jax.jit(staged_batch_norm.staged_sums)(a, b)
  np.testing.assert_allclose(sum_a, a.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(sum_b, b.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)


def _apply(module, variables, x, staged):
  with staged_batch_norm.batch_norm_staged(staged):
    return module.apply(variables, x, mutable=['batch_stats'])


@pytest.mark.parametrize(
  'shape, use_scale',
  [((6, 5, 7, 3), True), ((4, 8), True), ((6, 5, 7, 3), False)],  # 210 rows: not a multiple of 16
)
def test_values_gradients_and_running_averages_match_flax(shape, use_scale):
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=shape).astype(np.float32))
  module = nn.BatchNorm(use_running_average=False, momentum=0.9, use_scale=use_scale)
  variables = module.init(jax.random.key(0), x)
  channels = shape[-1]
  params = {'bias': jnp.linspace(-0.5, 0.5, channels)}
  if use_scale:
    params['scale'] = jnp.linspace(0.5, 2.0, channels)
  stats = {
    'mean': jnp.linspace(-1.0, 1.0, channels),
    'var': jnp.linspace(0.5, 1.5, channels),
  }

  def loss(params, x, staged):
    y, new = _apply(module, {'params': params, 'batch_stats': stats}, x, staged)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size), (y, new)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  (flax_grads, (flax_y, flax_new)) = grad(params, x, False)
  (staged_grads, (staged_y, staged_new)) = grad(params, x, True)
  np.testing.assert_allclose(staged_y, flax_y, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(staged_new), jax.tree.leaves(flax_new)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(staged_grads), jax.tree.leaves(flax_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert jax.tree.structure(staged_grads) == jax.tree.structure(flax_grads)
  assert set(variables['params']) == set(params)


def test_gradients_through_the_returned_mean_and_variance():
  """The backward rule also carries the mean and variance outputs' cotangents."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(37, 4)).astype(np.float32))
  scale, bias = jnp.array([1.0, 2.0, 0.5, 1.5]), jnp.array([0.1, -0.2, 0.3, 0.0])

  def reference(x, scale, bias):
    mean = x.mean(0)
    var = jnp.maximum(0.0, (x * x).mean(0) - mean * mean)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

  def loss(fn, x, scale, bias):
    y, mean, var = fn(x, scale, bias)
    return jnp.sum(y**2 * x) + jnp.sum(mean * jnp.arange(4.0)) + jnp.sum(jnp.sqrt(var))

  staged = functools.partial(staged_batch_norm.batch_norm, epsilon=1e-5)
  want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(x, scale, bias)
  got = jax.grad(functools.partial(loss, staged), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_output_dtype_matches_flax():
  x = jnp.ones((4, 3, 3, 2), jnp.bfloat16) * jnp.arange(2, dtype=jnp.bfloat16)
  module = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  (flax_y, _), (staged_y, _) = (_apply(module, variables, x, s) for s in (False, True))
  assert staged_y.dtype == flax_y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(staged_y, np.float32), np.asarray(flax_y, np.float32), atol=1e-2
  )


def test_calls_it_does_not_cover_run_flax_unchanged():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4, 4, 3)).astype(np.float32))
  train = nn.BatchNorm(use_running_average=False)
  variables = train.init(jax.random.key(0), x)
  with staged_batch_norm.batch_norm_staged():
    assert jax.tree.all(jax.tree.map(jnp.array_equal, train.init(jax.random.key(0), x), variables))
  evaluation = nn.BatchNorm(use_running_average=True)
  per_axis = nn.BatchNorm(use_running_average=False, axis=1)
  per_axis_variables = per_axis.init(jax.random.key(0), x)
  mask = jnp.arange(8 * 4 * 4 * 3).reshape(x.shape) % 2 == 0
  cases = [
    (evaluation, variables, {}),
    (per_axis, per_axis_variables, {}),
    (train, variables, {'mask': mask}),
  ]
  for module, module_variables, kwargs in cases:
    want = module.apply(module_variables, x, mutable=['batch_stats'], **kwargs)
    with staged_batch_norm.batch_norm_staged():
      got = module.apply(module_variables, x, mutable=['batch_stats'], **kwargs)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, got, want))


@pytest.fixture(scope='module')
def plain():
  return tiny_setup_and_batch('plain')


@pytest.fixture(scope='module')
def gated():
  return tiny_setup_and_batch('gated')


def _unstaged(monkeypatch):
  """Turns the staged batch norm off in steps.train_step (Flax's own batch norm runs)."""
  monkeypatch.setattr(
    staged_batch_norm, 'batch_norm_staged', lambda enabled=True: contextlib.nullcontext()
  )


def _barriers(setup, batch, compiled: bool) -> int:
  state = steps.create_state(setup, 0)
  lowered = jax.jit(functools.partial(steps.train_step, setup=setup)).lower(
    state, batch, jax.random.key(0)
  )
  if compiled:
    return lowered.compile().as_text().count('opt-barrier(')
  return lowered.as_text().count('stablehlo.optimization_barrier')


@pytest.mark.slow
@pytest.mark.parametrize(
  'compiled',
  [
    False,
    pytest.param(
      True,
      marks=pytest.mark.skipif(
        KEEP_BARRIERS not in os.environ.get('XLA_FLAGS', ''), reason='needs the CPU XLA flags'
      ),
    ),
  ],
)
def test_the_cpu_train_step_stages_every_batch_norm(plain, monkeypatch, compiled):
  setup, batch = plain
  assert steps.platform(setup) == 'cpu'
  norms = train_step_calls(setup, batch, nn.BatchNorm)
  assert norms > 5
  staged = _barriers(setup, batch, compiled)
  _unstaged(monkeypatch)
  # One barrier between the two stages of each batch norm's forward sums, one in its backward.
  assert staged - _barriers(setup, batch, compiled) == 2 * norms


# Steps compared. Summation order differs, and each step amplifies the rounding: with the strided
# convolutions padded symmetrically (2026-12-05) the gated model's third step reached 1.3e-4 in a
# few weights (from ~2e-5 before), where a near-tie of a binary gate can turn a rounding
# difference into a discrete one. Two steps still move every parameter away from its start.
STEPS = 2


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['plain', 'gated'])
def test_the_cpu_train_step_matches_flax_batch_norm(variant, request, monkeypatch):
  """Plain: the staged batch norms; gated: those and the gated batch norms."""
  setup, batch = request.getfixturevalue(variant)
  # XLA's own convolutions in both runs, so that only batch norm differs: this tiny model is
  # sensitive enough over a few steps that the native convolutions' rounding (the same step
  # from the same state agrees to ~2e-8) would grow past these tolerances on its own.
  monkeypatch.setattr(
    native_conv, 'native_convolutions', lambda enabled=True, mesh=None: contextlib.nullcontext()
  )
  step = jax.jit(functools.partial(steps.train_step, setup=setup))

  def train():
    state = steps.create_state(setup, 0)
    for i in range(STEPS):
      state, metrics = step(state, batch, jax.random.key(i))
    return state, metrics

  staged_state, staged_metrics = train()
  _unstaged(monkeypatch)
  step = jax.jit(functools.partial(steps.train_step, setup=setup))
  flax_state, flax_metrics = train()
  initial = steps.create_state(setup, 0)
  moved = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(flax_state.params), jax.tree.leaves(initial.params))
  ]
  assert max(moved) > 1e-3  # the steps really update the parameters
  np.testing.assert_allclose(staged_metrics['loss'], flax_metrics['loss'], rtol=1e-5)
  # Summation order differs, and the steps let the rounding grow (see STEPS).
  for a, b in zip(jax.tree.leaves(staged_state.params), jax.tree.leaves(flax_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  for a, b in zip(
    jax.tree.leaves(staged_state.batch_stats), jax.tree.leaves(flax_state.batch_stats)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_sums_of_one_shape_are_one_variadic_reduce():
  """Each stage of two same-shaped sums is one reduce with two results (one read of its
  inputs); sums of different shapes are separate."""
  a = jnp.ones((64, 4))

  def reductions(*arrays):
    jaxpr = str(jax.make_jaxpr(staged_batch_norm.staged_sums)(*arrays))
    return jaxpr.count(' reduce['), jaxpr.count('reduce_sum')

  assert reductions(a, a * 2) == (2, 0)  # one variadic reduce per stage
  assert reductions(a, jnp.ones((64, 3))) == (0, 4)


@pytest.mark.parametrize('rows, channels', [(128 * 32 * 32, 16), (128 * 8 * 8, 64)])
def test_compiled_staged_sums_are_two_fused_reduces(rows, channels):
  """sum(x) and sum(x^2) compile to two kernels, one per stage, and no `reduce-window`: XLA:CPU
  rewrites a long single-output reduction, such as a second stage over 8,192 partial sums, into
  chains of reduce-windows (5-7 kernels here), but leaves a variadic reduce alone. In
  ResNet-164-Gated's train step that was 1,952 of its 4,428 fusions (docs/performance.md)."""
  x = jnp.ones((rows, channels), jnp.float32)
  hlo = jax.jit(lambda x: staged_batch_norm.staged_sums(x, x * x)).lower(x).compile().as_text()
  entry = hlo[hlo.index('ENTRY') :]
  assert entry.count(' fusion(') == 2
  assert 'reduce-window' not in hlo


@pytest.mark.parametrize('positions, width', [(1024, 16), (64, 16), (49, 7), (13, 13), (17, 1)])
def test_per_sample_groups_divide_each_samples_positions(positions, width):
  assert staged_batch_norm._sample_group_width(positions) == width
  a = np.random.default_rng(positions).normal(size=(3, positions, 5)).astype(np.float32)
  (got,) = jax.jit(staged_batch_norm.staged_sums_per_sample)(a)
  np.testing.assert_allclose(got, a.astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)


class _Gated(nn.Module):
  @nn.compact
  def __call__(self, x, gate):
    return layers.batch_norm(True, dtype=jnp.float32, gated=True, name='bn')(x, gate)


@pytest.mark.parametrize(
  'shape',
  # positions per sample 35 (groups of 7), 64 (of 16), 17 (of 1), 1
  [(6, 5, 7, 3), (4, 8, 8, 16), (5, 17, 1, 2), (9, 1, 1, 4)],
)
def test_gated_batch_norm_matches_batch_norm_then_the_gate(shape):
  """Values, running averages and the gradients of x, gamma, beta and the gates."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=shape).astype(np.float32))
  # Binary and fractional gates, as SemHash's two training modes give.
  gate = jnp.asarray(rng.choice([0.0, 1.0, 0.3], size=(shape[0], shape[-1])).astype(np.float32))
  variables = _Gated().init(jax.random.key(0), x, gate)
  c = shape[-1]
  params = {'bn': {'scale': jnp.linspace(0.5, 2.0, c), 'bias': jnp.linspace(-0.5, 0.5, c)}}

  def loss(params, x, gate, staged):
    with staged_batch_norm.batch_norm_staged(staged):
      y, new = _Gated().apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, gate,
        mutable=['batch_stats'],
      )  # fmt: skip
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size), (y, new)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  flax_grads, (flax_y, flax_new) = grad(params, x, gate, False)
  fused_grads, (fused_y, fused_new) = grad(params, x, gate, True)
  np.testing.assert_allclose(fused_y, flax_y, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(fused_new), jax.tree.leaves(flax_new)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(fused_grads) == jax.tree.structure(flax_grads)
  for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(flax_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(fused_grads[2]))) > 1e-3  # the gates' gradient is not vacuous


def test_gated_batch_norm_in_bfloat16_has_flax_dtypes():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3, 3, 2)), jnp.bfloat16)
  gate = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]], jnp.float32)
  module = layers.GatedBatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x, gate)

  def run(staged):
    def loss(x, gate):
      with staged_batch_norm.batch_norm_staged(staged):
        y, _ = module.apply(variables, x, gate, mutable=['batch_stats'])
      return jnp.sum(y.astype(jnp.float32) ** 2), y

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, gate)

  (flax_dx, flax_dgate), flax_y = run(False)
  (dx, dgate), y = run(True)
  assert (y.dtype, dx.dtype, dgate.dtype) == (flax_y.dtype, flax_dx.dtype, flax_dgate.dtype)
  assert y.dtype == jnp.bfloat16 and dgate.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(flax_y, np.float32), atol=2e-2)
  np.testing.assert_allclose(dgate, flax_dgate, rtol=5e-2, atol=5e-2)


def test_gated_calls_it_does_not_cover_run_the_module_unchanged():
  """Evaluation and a gate of the wrong shape: exactly flax's batch norm, then the gate."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3, 3, 2)).astype(np.float32))
  gate = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]], jnp.float32)
  train = layers.GatedBatchNorm(use_running_average=False)
  variables = train.init(jax.random.key(0), x, gate)
  cases = [
    (layers.GatedBatchNorm(use_running_average=True), gate),
    (train, gate[:1]),  # (1, C): broadcasts over the batch, not a per-sample gate
  ]
  for module, g in cases:
    want = module.apply(variables, x, g, mutable=['batch_stats'])
    with staged_batch_norm.batch_norm_staged():
      got = module.apply(variables, x, g, mutable=['batch_stats'])
    stats_want, stats_got = want[1], got[1]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(stats_got) == jax.tree.structure(stats_want)


def test_the_cpu_train_step_fuses_every_gated_batch_norm(gated, monkeypatch):
  """Each backbone unit's gated batch norm runs as one `gated_batch_norm`; the others as
  `batch_norm`."""
  setup, batch = gated
  calls = collections.Counter()
  for name in ('batch_norm', 'gated_batch_norm'):
    original = getattr(staged_batch_norm, name)
    monkeypatch.setattr(
      staged_batch_norm, name,
      lambda *a, _f=original, _n=name: calls.update([_n]) or _f(*a),
    )  # fmt: skip
  norms = train_step_calls(setup, batch, nn.BatchNorm)
  gated_norms = train_step_calls(setup, batch, layers.GatedBatchNorm)
  units = len(setup.model.backbone.gate_layout(setup.info.image_shape))
  assert gated_norms == units > 1
  assert calls['gated_batch_norm'] == 2 * units  # two traced steps
  assert calls['batch_norm'] == 2 * (norms - units)
