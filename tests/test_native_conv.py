"""Native CPU convolutions: values and gradients equal XLA's, the fallbacks, the model wiring."""

import functools
import json
import os
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_on_cpu_devices, tiny_setup_and_batch, train_step_calls
from jax import lax

from gaternet_jax.cpu import native, native_conv
from gaternet_jax.training import steps

pytestmark = pytest.mark.skipif(
  not native.available(), reason=f'native kernels unavailable: {native.unavailable_reason()}'
)

# (batch, height, width, in channels, out channels, kernel, stride, padding)
CASES = [
  (3, 9, 7, 16, 16, (3, 3), (1, 1), 'SAME'),
  (2, 8, 8, 16, 32, (3, 3), (2, 2), 'SAME'),  # (0, 1) padding: XLA's stride-2 'SAME'
  (2, 9, 9, 5, 48, (3, 3), (2, 2), 'SAME'),  # odd size, Ci not a multiple of 16, TV = 1 x 3
  (1, 7, 10, 3, 16, (3, 3), (1, 1), 'VALID'),
  (2, 6, 6, 24, 64, (1, 1), (1, 1), 'VALID'),
  (2, 11, 11, 8, 32, (7, 7), (2, 2), ((3, 3), (3, 3))),  # an ImageNet stem, small
  (2, 9, 9, 32, 16, (1, 7), (1, 1), ((0, 0), (3, 3))),  # Inception's factorised 1x7
  (2, 9, 9, 16, 32, (3, 3), (1, 1), ((2, 0), (0, 1))),  # asymmetric explicit padding
  (1, 4, 4, 40, 16, (3, 3), (1, 1), 'SAME'),  # Ci past two tiles of 16, remainder 8
  (2, 8, 8, 16, 12, (3, 3), (1, 1), 'SAME'),  # DenseNet's growth rate: less than a vector
  (2, 8, 8, 12, 27, (3, 3), (1, 1), 'SAME'),  # an export's pruned width: a vector and 11
  (2, 6, 6, 8, 53, (1, 1), (1, 1), 'VALID'),  # two vectors (one block) and 21 channels
  (2, 9, 9, 7, 48, (3, 3), (2, 2), 'SAME'),  # one block of two vectors and one whole vector
  (2, 8, 8, 16, 32, (1, 1), (2, 2), 'VALID'),  # a strided projection: dx is 0 at odd pixels
  (1, 10, 10, 16, 16, (3, 3), (3, 3), 'SAME'),  # stride 3
]


def _inputs(case, seed=0):
  n, h, w, ci, co, kernel, _, _ = case
  kx, kw_, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, h, w, ci), jnp.float32)
  kernel_ = jax.random.normal(kw_, (*kernel, ci, co), jnp.float32) / np.sqrt(ci * np.prod(kernel))
  return x, kernel_, kd


def _xla(x, w, strides, padding):
  return lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _native(x, w, strides, padding):
  return native_conv.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES, ids=str)
def test_forward_and_gradients_match_xla(case):
  *_, strides, padding = case
  x, w, kd = _inputs(case)
  ref = jax.jit(lambda x, w: _xla(x, w, strides, padding))(x, w)
  got = jax.jit(lambda x, w: _native(x, w, strides, padding))(x, w)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  dy = jax.random.normal(kd, ref.shape, jnp.float32)

  def grads(fn):
    return jax.jit(lambda x, w: jax.vjp(lambda x, w: fn(x, w, strides, padding), x, w)[1](dy))(x, w)

  (dx_ref, dw_ref), (dx, dw) = grads(_xla), grads(_native)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('case', [CASES[0], CASES[1]], ids=['stride1', 'stride2'])
def test_the_kernels_are_the_ones_computing(case):
  *_, strides, padding = case
  x, w, _ = _inputs(case)

  def loss(x, w):
    return jnp.sum(_native(x, w, strides, padding) ** 2)

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  # Stride 1: dx is the forward kernel on the flipped kernel; larger strides: the transposed one.
  strided = strides != (1, 1)
  assert text.count(f'@{native_conv.FORWARD_TARGET}(') == 1 + (not strided)
  assert text.count(f'@{native_conv.INPUT_GRAD_TARGET}(') == strided
  assert text.count(f'@{native_conv.WEIGHT_GRAD_TARGET}(') == 1
  assert 'stablehlo.convolution' not in text


@pytest.mark.parametrize('case', CASES, ids=str)
def test_the_transposed_kernel_is_dx_at_every_stride(case):
  # The backward pass uses it for strided convolutions only; it computes dx at stride 1 too.
  *_, strides, padding = case
  x, w, kd = _inputs(case)
  y, pull = jax.vjp(lambda x: _xla(x, w, strides, padding), x)
  dy = jax.random.normal(kd, y.shape)
  pads = native_conv.native_padding(x, w, strides, padding, dimension_numbers=native_conv.NHWC)
  got = jax.jit(lambda dy: native_conv.input_gradient(dy, w, x.shape, strides, pads))(dy)
  np.testing.assert_allclose(got, pull(dy)[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
  'dtype, co, kwargs',
  [
    (jnp.bfloat16, 16, {}),
    (jnp.float32, 16, {'rhs_dilation': (2, 2)}),
    (jnp.float32, 16, {'feature_group_count': 2}),
    (jnp.float32, 16, {'padding': ((-1, 0), (0, 0))}),
  ],
)
def test_uncovered_convolutions_are_xlas_own(dtype, co, kwargs):
  kwargs = dict(kwargs)
  padding = kwargs.pop('padding', 'SAME')
  groups = kwargs.get('feature_group_count', 1)
  x = jnp.ones((2, 8, 8, 16), dtype)
  w = jnp.ones((3, 3, 16 // groups, co), dtype)
  call = functools.partial(
    native_conv.conv_general_dilated,
    window_strides=(1, 1),
    padding=padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    **kwargs,
  )
  text = jax.jit(jax.grad(lambda x, w: jnp.sum(call(x, w).astype(jnp.float32)), 1)).lower(x, w)
  text = text.as_text()
  assert 'gaternet_conv' not in text
  ref = lax.conv_general_dilated(
    x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), **kwargs
  )
  np.testing.assert_array_equal(call(x, w), ref)


def test_concurrent_calls_neither_deadlock_nor_mix_results():
  # Independent convolutions in one program may run at the same time on XLA's thread pool, and
  # several Python threads may run programs at once: every result must still be its own.
  case = CASES[0]
  *_, strides, padding = case
  xs = [_inputs(case, seed)[0] for seed in range(4)]
  w = _inputs(case)[1]
  many = jax.jit(lambda *xs: [_native(x, w, strides, padding) for x in xs])
  expected = [_xla(x, w, strides, padding) for x in xs]
  results = [None] * 3

  def run(i):
    results[i] = many(*xs)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  for result in results:
    assert result is not None
    for got, want in zip(result, expected):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_repeated_calls_give_the_same_bits():
  # The weight gradient sums over the batch on several threads: its order of summation must not
  # depend on which thread took which images, or reruns (and resumed runs) would drift.
  x, w, kd = _inputs((64, 8, 8, 16, 32, (3, 3), (1, 1), 'SAME'))
  dy = jax.random.normal(kd, (64, 8, 8, 32))
  dw = jax.jit(lambda x, dy: native_conv.weight_gradient(x, dy, w.shape, (1, 1), ((1, 1), (1, 1))))
  first = np.asarray(dw(x, dy))
  for _ in range(30):
    np.testing.assert_array_equal(np.asarray(dw(x, dy)), first)


@pytest.mark.slow
def test_the_train_step_uses_them_and_matches_xla():
  setup, batch = tiny_setup_and_batch('plain')
  state = steps.create_state(setup, 0)
  x = steps.preprocess(setup.config, setup.info, batch['image'], None)

  def loss(params, enabled):
    with native_conv.native_convolutions(enabled, mesh=setup.mesh):
      (logits, _), _ = setup.model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
      )
    return jnp.mean(logits**2)

  native_value, native_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(state.params)
  xla_value, xla_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(state.params)
  np.testing.assert_allclose(native_value, xla_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(native_grads), jax.tree.leaves(xla_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  step = jax.jit(functools.partial(steps.train_step, setup=setup))
  text = step.lower(state, batch, jax.random.key(0)).as_text()
  convs = train_step_calls(setup, batch, nn.Conv)
  assert convs == 7  # ResNet-8: the stem and 3 units of 2
  assert text.count(native_conv.WEIGHT_GRAD_TARGET) == convs
  eval_text = (
    jax.jit(functools.partial(steps.eval_step, setup=setup))
    .lower(state, dict(batch, mask=jnp.ones(batch['label'].shape[0])))
    .as_text()
  )
  assert eval_text.count(native_conv.FORWARD_TARGET) == convs


def test_a_user_set_conv_function_is_left_alone():
  calls = []

  def mine(*args, **kwargs):
    calls.append(1)
    return lax.conv_general_dilated(*args, **kwargs)

  conv = nn.Conv(16, (3, 3), use_bias=False, conv_general_dilated=mine)
  x = jnp.ones((1, 4, 4, 16))
  variables = conv.init(jax.random.key(0), x)
  with native_conv.native_convolutions():
    text = jax.jit(conv.apply).lower(variables, x).as_text()
  assert calls and 'gaternet_conv' not in text


@pytest.mark.slow
def test_several_devices_give_the_one_device_result():
  # 4 simulated CPU devices: per-device kernels on each part of the batch, dw summed by psum.
  script = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from gaternet_jax.training import steps
from gaternet_jax.cpu import native_conv
mesh = steps.make_mesh()
x = jax.random.normal(jax.random.key(0), (8, 8, 8, 16))
w = jax.random.normal(jax.random.key(1), (3, 3, 16, 32)) / 12
x = jax.device_put(x, NamedSharding(mesh, P('data')))
def loss(x, w, fn):
  return jnp.sum(jnp.sin(fn(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
native = lambda *a, **k: native_conv.conv_general_dilated(*a, **k, mesh=mesh)
g = jax.jit(jax.grad(lambda x, w: loss(x, w, native), (0, 1)))
ref = jax.jit(jax.grad(lambda x, w: loss(x, w, lax.conv_general_dilated), (0, 1)))(x, w)
got = g(x, w)
text = g.lower(x, w).as_text()
print(json.dumps({
  'devices': len(jax.devices()),
  'dx': float(jnp.max(jnp.abs(got[0] - ref[0]))),
  'dw': float(jnp.max(jnp.abs(got[1] - ref[1]))),
  'native': text.count('gaternet_conv_weight_grad'),
}))
"""
  result = run_on_cpu_devices(script, devices=4)
  assert result['devices'] == 4 and result['native'] >= 1
  assert result['dx'] < 1e-4 and result['dw'] < 1e-4


def _fresh_python(code: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO,
    env=dict(os.environ, **env),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


AVAILABILITY = """
from gaternet_jax.cpu import native
from gaternet_jax.cpu import native_conv
import jax, jax.numpy as jnp
ok = native.available()
f = jax.jit(lambda x, w: native_conv.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
x, w = jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 16))
with native_conv.native_convolutions():
  pass
print(ok, '|', native.unavailable_reason(), '|', float(f(x, w).sum()) if ok else 'xla')
"""


@pytest.mark.slow
@pytest.mark.parametrize(
  'env, reason',
  [
    ({native.SWITCH_VARIABLE: '0'}, 'GATERNET_NATIVE_KERNELS=0'),
    ({native.SWITCH_VARIABLE: 'off'}, 'GATERNET_NATIVE_KERNELS=off'),
    ({native.SWITCH_VARIABLE: 'False'}, 'GATERNET_NATIVE_KERNELS=False'),
    ({'CXX': '/nonexistent/c++'}, 'no C++ compiler found'),
    ({'CXX': 'false'}, 'false failed'),
  ],
)
def test_unavailable_kernels_say_why_and_fall_back(env, reason, tmp_path):
  env = dict(env, **{native.CACHE_VARIABLE: str(tmp_path)})
  result = _fresh_python(AVAILABILITY, env)
  assert result.returncode == 0, result.stderr[-2000:]
  ok, why, _ = (part.strip() for part in result.stdout.strip().splitlines()[-1].split('|'))
  assert ok == 'False' and reason in why


@pytest.mark.slow
def test_the_library_is_built_once_per_cache_and_reused(tmp_path):
  env = {native.CACHE_VARIABLE: str(tmp_path)}
  first = _fresh_python(AVAILABILITY, env)
  assert first.returncode == 0, first.stderr[-2000:]
  assert first.stdout.strip().splitlines()[-1].startswith('True')
  (library,) = [p for p in os.listdir(tmp_path) if p.endswith('.so')]
  stamp = os.stat(tmp_path / library).st_mtime_ns
  second = _fresh_python(AVAILABILITY, env)
  assert second.returncode == 0 and second.stdout.strip().splitlines()[-1].startswith('True')
  # No second library, no partial file left; the library's checksum beside it.
  assert sorted(os.listdir(tmp_path)) == [library, library + '.sha256']
  assert os.stat(tmp_path / library).st_mtime_ns == stamp
  # 9 conv taps of ones over a 4x4 image of ones, 16 channels: corners 4, edges 6, inside 9.
  expected = str(float(16 * 16 * (4 * 4 + 4 * 2 * 6 + 4 * 9)))
  assert first.stdout.strip().endswith(expected)

  # A truncated library (a copy cut short, a full disk) is rebuilt, not loaded: loading it died
  # of SIGBUS in every later process.
  size = os.path.getsize(tmp_path / library)
  with open(tmp_path / library, 'r+b') as f:
    f.truncate(20_000)
  third = _fresh_python(AVAILABILITY, env)
  assert third.returncode == 0, third.stderr[-2000:]
  assert third.stdout.strip().splitlines()[-1].startswith('True')
  assert third.stdout.strip().endswith(expected)
  assert 'does not match its checksum' in third.stderr
  assert os.path.getsize(tmp_path / library) == size and native.verified(str(tmp_path / library))
  assert sorted(os.listdir(tmp_path)) == [library, library + '.sha256']


@pytest.mark.slow
@pytest.mark.parametrize('value', ['garbage', '', 'nope'])
def test_an_unknown_switch_value_is_one_line(value, cli):
  result = cli(
    'describe', '--config', 'experiments/default.py', env={native.SWITCH_VARIABLE: value}
  )
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert f'GATERNET_NATIVE_KERNELS={value!r} is not an on/off value' in errors[0]


OTHER_BUILD = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from gaternet_jax.cpu import native
from gaternet_jax.cpu import native_conv
assert native.available(), native.unavailable_reason()
worst = 0.0
for n, h, ci, co, k, s in [(3, 9, 16, 16, 3, 1), (2, 8, 5, 48, 3, 2), (2, 7, 32, 64, 1, 1), (2, 7, 12, 27, 3, 1)]:
  x = jax.random.normal(jax.random.key(0), (n, h, h, ci))
  w = jax.random.normal(jax.random.key(1), (k, k, ci, co)) / (3 * np.sqrt(ci))
  def loss(x, w, fn):
    return jnp.sum(jnp.sin(fn(x, w, (s, s), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
  got = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, native_conv.conv_general_dilated), (0, 1)))(x, w)
  ref = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, lax.conv_general_dilated), (0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    worst = max(worst, float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)))
print(json.dumps({'worst': worst, 'library': native.library_path()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
  not native.measured_cpu(), reason='builds the other x86-64 tiles on an AVX-512 CPU'
)
@pytest.mark.parametrize('flags', ['-mno-avx512f', '-march=x86-64'], ids=['avx2', 'sse2'])
def test_the_avx2_and_sse_builds_compute_the_same(flags, tmp_path):
  result = _fresh_python(
    OTHER_BUILD,
    {
      native.SWITCH_VARIABLE: '1',
      native.FLAGS_VARIABLE: flags,
      native.CACHE_VARIABLE: str(tmp_path),
    },
  )
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['library'].startswith(str(tmp_path))
  assert out['worst'] < 1e-5
