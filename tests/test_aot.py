"""`gaternet compile`: TPU slice names, the checks made before compiling, and (where libtpu is
installed: `pip install -e '.[tpu]'`) the compiled step's memory and cost against the config."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, load_experiment

from gaternet_jax.commands import aot
from gaternet_jax.errors import UserError

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
  not HAS_LIBTPU,
  reason="libtpu is not installed (pip install -e '.[tpu]'): nothing to compile with",
)


def test_slice_names_as_cloud_tpu_names_them():
  v4 = aot.parse_slice('v4-32')
  assert (v4.topology, v4.devices, v4.chip_config) == ('v4:2x2x4', 16, 'megacore')
  v5e = aot.parse_slice('v5e-64')
  assert (v5e.topology, v5e.devices, v5e.chip_config) == ('v5e:8x8', 64, 'default')
  assert aot.parse_slice('v5p-128').topology == 'v5:4x4x4'
  assert aot.parse_slice('v4:2x2x2').devices == 8 and aot.parse_slice('V5E:4x4').devices == 16
  for name in aot.known_names():
    assert aot.parse_slice(name).devices >= 1


@pytest.mark.parametrize('name', ['v9-8', 'v4-33', 'v4-6', 'v5e-3', 'v4:2x2', 'tpu', ''])
def test_an_unknown_topology_is_one_line_listing_the_known_ones(name):
  with pytest.raises(UserError, match='unknown TPU topology') as refused:
    aot.parse_slice(name)
  assert 'v4-32' in str(refused.value) and '\n' not in str(refused.value)


def test_a_batch_the_slice_cannot_divide_is_refused_before_compiling():
  config = load_experiment('default', 'gated')  # batch 100
  with pytest.raises(UserError, match='batch_size 100 is not a multiple of the 8 devices') as e:
    aot.compile_for(config, 'v4-16')
  assert '--config.batch_size=104' in str(e.value)


@pytest.mark.slow
@pytest.mark.skipif(HAS_LIBTPU, reason='libtpu is installed here')
def test_without_libtpu_the_command_says_how_to_install_it(cli):
  result = cli(
    'compile', '--config', 'experiments/default.py', '--topology', 'v4-8',
    '--config.batch_size=128', '--config.eval_batch_size=128',
  )  # fmt: skip
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert "pip install -e '.[tpu]'" in errors[0]


@needs_libtpu
@pytest.mark.parametrize('topology', ['v4-8', 'v5e-16'])
def test_the_compiled_step_matches_the_config(topology):
  config = load_experiment('default', 'gated')
  config.batch_size = config.eval_batch_size = 128
  # 128 channels and more: a TPU pads arrays to (8, 128) tiles, which multiplies the bytes of the
  # default's 16-channel kernels (x2.8) but adds <0.1% here (and 2.6% to ResNet-101-Gated).
  config.model.width = config.gater.extractor_width = 8.0
  result = aot.compile_for(config, topology)
  devices = aot.parse_slice(topology).devices
  assert result['devices'] == devices and result['per_chip_batch'] == 128 // devices
  # The arguments are the replicated state, this chip's share of the batch and the key.
  expected = result['state_bytes'] + result['batch_bytes_per_chip']
  assert expected <= result['argument_bytes'] <= expected * 1.01
  assert result['alias_bytes'] >= result['state_bytes'] * 0.99  # the donated state is reused
  assert result['fits'] and 0 < result['peak_bytes'] < result['hbm_bytes']
  # Training a network costs about 3x its forward pass (forward + two backward products), 2
  # FLOPs per MAC: about 6 x MACs per image, here with the gater's and SemHash's extras.
  assert 3 * result['macs_per_image'] < result['flops_per_image'] < 12 * result['macs_per_image']
  assert result['projected_images_per_s'] > 0 and result['bound'] in ('compute', 'memory')
  # Nothing CPU-only reaches a TPU: no custom call of ours (the native convolutions).
  assert not [c for c in result['custom_calls'] if 'gaternet' in c]
  assert 'per chip' in aot.format_text(result)


@needs_libtpu
def test_a_step_that_does_not_fit_says_what_to_change():
  result = {
    'fits': False, 'peak_bytes': 40 * aot.GIB, 'eval_peak_bytes': 1, 'config': 'x',
    'variant': 'gated', 'chip': 'v5e', 'topology': 'v5e-16', 'state_bytes': aot.GIB,
    'temp_bytes': 38 * aot.GIB, 'hbm_bytes': 16 * aot.GIB, 'batch_size': 4096,
    'per_chip_batch': 256,
  }  # fmt: skip
  with pytest.raises(UserError, match='does not fit .* 40.0 GiB .* 16 GiB of HBM; lower'):
    aot.check_fits(result)


@needs_libtpu
@pytest.mark.slow
def test_ctrl_c_during_the_compile_stops_it_at_once():
  # ResNet-164-Gated for one v5e chip: lowered in about 10 s, then minutes inside XLA's compile,
  # where Python would run the handler only when the compile returns.
  process = subprocess.Popen(
    [sys.executable, '-m', 'gaternet_jax.main', 'compile', '--config',
     'experiments/cifar10_resnet164.py', '--topology', 'v5e-1'],
    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    # This test process may hold libtpu's lockfile (the compiles above): libtpu's own switch.
    env=dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD='1'),
  )  # fmt: skip
  try:
    time.sleep(30)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 5.0
  finally:
    process.kill()
  assert process.returncode == 130 and out == '', err[-2000:]
  assert 'gaternet: stopped by SIGINT during the compile for v5e-1; nothing was written' in err
