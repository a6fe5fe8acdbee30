"""The benchmark scripts run and print the one JSON line their docstrings promise."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO


def _json_line(*args):
  result = subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_throughput_prints_medians_of_its_rounds():
  out = _json_line(
    'benchmarks/throughput.py', '--config', 'experiments/default.py', '--variants', 'plain',
    '--steps', '2', '--rounds', '2', '--steps_per_dispatch', '2',
  )  # fmt: skip
  plain = out['plain']
  assert plain['steps_per_dispatch'] == 2 and plain['batch_size'] == 100
  for kind in ('train_images_per_s', 'inference_images_per_s'):
    rounds = plain[kind]['rounds']
    assert len(rounds) == 2 and all(r > 0 for r in rounds)
    assert min(rounds) <= plain[kind]['median'] <= max(rounds)
  assert out['backend'] == 'cpu' and 'pytorch' not in out
  # Says what ran: the native kernels (True, or why not) and whether freed memory was kept.
  assert out['native_kernels'] is True or isinstance(out['native_kernels'], str)
  assert isinstance(out['freed_memory_kept'], bool)


@pytest.mark.slow
def test_compile_time_reports_each_config_cold():
  out = _json_line('benchmarks/compile_time.py', '--configs', 'experiments/default.py:plain')
  row = out['experiments/default.py:plain']
  assert abs(row['total_s'] - row['trace_s'] - row['compile_s']) <= 0.02
  assert row['compile_s'] > 0 and row['init_s'] > 0 and row['params'] > 0


@pytest.mark.slow
def test_conv_width_times_every_stage_and_width():
  out = _json_line('benchmarks/conv_width.py', '--batch_size', '2', '--rounds', '1', '--calls', '1')
  times = out['ms_per_call']
  assert len(times) == 12 and '32x32x16->4' in times and '8x8x64->64' in times
  assert all(t > 0 for t in times.values())


@pytest.mark.slow
def test_conv_kernels_times_every_layer_and_part_of_both_implementations():
  out = _json_line(
    'benchmarks/conv_kernels.py', '--batch_size', '2', '--calls', '1', '--rounds', '1'
  )
  layers = out['ms']
  names = ['xla'] + (['native'] if out['native_kernels'] is True else [])
  assert len(layers) == 5 * len(names) and '8x8x64->64/s1/xla' in layers
  for times in layers.values():
    assert set(times) == {'forward', 'dx', 'dw'} and all(t > 0 for t in times.values())


@pytest.mark.slow
def test_inference_times_the_gaternet_its_export_and_the_plain_backbone(gated_run, tmp_path):
  workdir, _ = gated_run
  export_dir = str(tmp_path / 'export')
  subprocess.run(
    [sys.executable, '-m', 'gaternet_jax.main', 'export', '--workdir', workdir, '--out', export_dir,
     '--max-examples', '200'],
    cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
  )  # fmt: skip
  out = _json_line(
    'benchmarks/inference.py', '--workdir', workdir, '--export', export_dir, '--batch_size', '32',
    '--rounds', '2', '--steps', '2', '--latency_calls', '3',
  )  # fmt: skip
  timed = {'gaternet', 'gaternet_skip', 'export', 'plain'}
  if json.load(open(os.path.join(export_dir, 'export.json')))['gates_kept']:
    timed.add('export_skip')  # an export with gates left is a GaterNet, and skips units too
  assert set(out['images_per_s']) == timed
  assert set(out['latency_ms']) == timed | {'skip_bound'}
  assert set(out['latency_ms_images']) == timed
  assert all(v > 0 for v in [*out['images_per_s'].values(), *out['latency_ms'].values()])
  on, total = map(int, out['skip_bound_image_gates_on'].split('/'))
  assert total == 112 and 0 <= on <= total and out['batch_size'] == 32
  units_on, units = map(int, out['units_on_first_image'].split('/'))
  assert units == 3 and 0 <= units_on <= units and 0 <= out['units_on_per_image_mean'] <= units
  rounds = out['round_images_per_s']
  assert set(rounds) == timed and all(len(v) == 2 for v in rounds.values())
  assert set(out['vs_gaternet']) == timed - {'gaternet'}
  ratios = [e / g for e, g in zip(rounds['export'], rounds['gaternet'])]
  paired = out['vs_gaternet']['export']
  assert paired['min'] <= paired['median'] <= paired['max']
  assert abs(paired['median'] - sum(ratios) / 2) < 2e-3  # the median of two rounds is their mean
  assert paired['faster'] == f'{sum(r > 1 for r in ratios)}/2'
  for key in ('latency_vs_gaternet', 'latency_images_vs_gaternet'):
    for name, ratio in out[key].items():
      assert ratio['min'] <= ratio['median'] <= ratio['max'], (key, name)
      assert int(ratio['faster'].split('/')[1]) == 3
  assert set(out['latency_vs_gaternet']) == timed - {'gaternet'} | {'skip_bound'}


@pytest.mark.slow
def test_step_profile_times_each_variant_and_precision():
  out = _json_line(
    'benchmarks/step_profile.py', '--config', 'experiments/default.py', '--variants', 'plain',
    '--precisions', 'float32,bfloat16', '--steps_per_dispatch', '2', '--chunks', '1',
  )  # fmt: skip
  assert out['backend'] == 'cpu'
  for precision in ('float32', 'bfloat16'):
    row = out[f'plain/{precision}']
    assert row['wall_ms_per_step'] > 0 and row['steps_per_dispatch'] == 2
    assert 'kernels_per_step' not in row  # the CPU trace has no device plane


# A device plane as an H100 trace has it: kernels on a stream line, repeated by HLO op on 'XLA Ops'.
_TRACE = """
planes { name: "/device:GPU:0"
  lines { name: "Stream #13(Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
    events { metadata_id: 2 offset_ps: 6000000 duration_ps: 3000000 }
    events { metadata_id: 3 offset_ps: 9000000 duration_ps: 1000000 } }
  lines { name: "XLA Ops" events { metadata_id: 2 offset_ps: 0 duration_ps: 9000000 } }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_fprop_implicit_gemm_f32f32" } }
  event_metadata { key: 2 value { id: 2 name: "input_reduce_fusion_7" } }
  event_metadata { key: 3 value { id: 3 name: "loop_convert_fusion" } } }
planes { name: "/host:CPU" lines { name: "python" events { metadata_id: 1 duration_ps: 7 } }
  event_metadata { key: 1 value { id: 1 name: "host work" } } }
"""


@pytest.mark.slow
def test_step_profile_reads_the_kernels_of_device_stream_lines(tmp_path):
  from jax.profiler import ProfileData

  (tmp_path / 'host.xplane.pb').write_bytes(ProfileData.text_proto_to_serialized_xspace(_TRACE))
  script = (
    'import json, sys; sys.path.insert(0, "benchmarks"); import step_profile as p; '
    f'k = p.device_kernels({str(tmp_path)!r}); '
    'print(json.dumps([k, [p.kernel_group(name) for name, _ in k]]))'
  )
  kernels, groups = _json_line('-c', script)
  assert kernels == [
    ['sm90_xmma_fprop_implicit_gemm_f32f32', 0.005], ['input_reduce_fusion_7', 0.003],
    ['loop_convert_fusion', 0.001],
  ]  # fmt: skip
  assert groups == ['conv_or_matmul', 'reduction', 'convert']


def _tiny_image_folder(root):
  from PIL import Image  # noqa: PLC0415

  rng = np.random.default_rng(0)
  for c in range(10):
    folder = root / 'train' / f'class{c}'
    folder.mkdir(parents=True)
    for i in range(16):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')


@pytest.mark.slow
def test_pytorch_reference_trains_both_implementations_on_one_holdout(tmp_path):
  # torch is an optional extra (the `benchmark` extra): without it there is nothing to compare.
  pytest.importorskip('torch', reason='the PyTorch anchor needs the benchmark extra (torch)')
  _tiny_image_folder(tmp_path / 'data')
  args = [
    'benchmarks/pytorch_reference.py', '--train', '--data_dir', str(tmp_path / 'data'),
    '--workdir', str(tmp_path / 'w'), '--epochs', '2', '--seeds', '0,1', '--holdout', '20',
  ]  # fmt: skip
  out = _json_line(*args)
  for impl in ('ours', 'torch'):
    errors = out[impl]['holdout_top1_error']
    assert set(errors) == {'0', '1'} and all(0 <= e <= 100 for e in errors.values())
    assert out[impl]['mean'] == pytest.approx(sum(errors.values()) / 2)
  assert out['mean_difference'] == pytest.approx(out['ours']['mean'] - out['torch']['mean'])
  # A rerun reads the finished runs back instead of training again.
  assert _json_line(*args) == out


@pytest.mark.slow
def test_pytorch_reference_resumes_at_an_epoch_boundary_to_the_same_weights(tmp_path):
  pytest.importorskip('torch', reason='the PyTorch anchor needs the benchmark extra (torch)')
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location(
    'pytorch_reference', 'benchmarks/pytorch_reference.py'
  )
  reference = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(reference)
  _tiny_image_folder(tmp_path / 'data')
  split = reference.holdout_split(str(tmp_path / 'data'), 20)
  straight = reference.train_torch(split, 3, seed=0)
  checkpoint = str(tmp_path / 'torch.pt')
  first = reference.train_torch(split, 3, seed=0, checkpoint=checkpoint)
  # The file now holds the start of the last epoch, as a run killed during it would have left.
  resumed = reference.train_torch(split, 3, seed=0, checkpoint=checkpoint)
  for run in (first, resumed):
    assert run['parameter_sum'] == straight['parameter_sum']
    assert run['holdout_top1_error'] == straight['holdout_top1_error']


@pytest.mark.slow
def test_gate_gradients_reports_the_dead_zone_and_the_forces_on_fc2s_bias(gated_run):
  workdir, _ = gated_run
  out = _json_line('benchmarks/gate_gradients.py', '--workdir', workdir, '--batches', '2')
  assert out['examples'] == 200 and out['gates'] > 0 and 0 <= out['gate_density'] <= 1
  zone = out['dead_zone']
  assert 0 <= zone['gates_below_on_every_example'] <= zone['below_share'] <= 1
  assert 0 < zone['expected_noisy_share'] < 1  # N(0, 1) noise reaches past +-2.4 sometimes
  bias = out['fc2_bias']
  # The L1 term only ever pushes a gate's bias down (closing), on every gate.
  assert bias['l1_grad_mean'] > 0 and bias['l1_closing_share'] == 1.0
  assert bias['weight_decay_grad_mean'] == pytest.approx(
    out['weight_decay'] * bias['mean'], rel=1e-4
  )
  plain = _json_line_fails(
    'benchmarks/gate_gradients.py', '--workdir', f'{workdir}/stage1_backbone'
  )
  assert 'holds no GaterNet' in plain


def _json_line_fails(*args):
  result = subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
  )
  assert result.returncode == 2, result.stderr[-2000:]
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_gpu_check_runs_both_calls_in_smoke_mode(tmp_path):
  """The prepared GPU check cannot rot between leases: both calls on the CPU, tiny budget."""
  out, work = str(tmp_path / 'out'), str(tmp_path / 'work')
  args = ['benchmarks/gpu_check.py', '--smoke', '--out', out, '--work', work]
  a = _json_line(*args, '--call', 'A')
  assert a['plain_164_epochs']['step'] == 6
  assert set(a['plain_164_epochs']['time_split_s']) >= {'first_dispatch', 'train', 'eval'}
  for part in ('throughput_f32_b16', 'throughput_bf16_b32'):
    assert a[part]['plain']['train_images_per_s']['median'] > 0
    assert a[part]['gated']['batch_size'] == int(part.rsplit('b', 1)[1])
  b = _json_line(*args, '--call', 'B', '--l1_weight', '0.5')
  gated = b['gated_joint_164_epochs']
  assert gated['step'] == 6 and 'gate_density' in gated['eval']
  parts = [json.loads(l)['part'] for l in open(os.path.join(out, 'gpu_check.jsonl'))]
  assert parts == [
    'throughput_f32_b16',
    'throughput_bf16_b32',
    'plain_164_epochs',
    'gated_joint_164_epochs',
    'population_vmap',
  ]
  assert os.path.exists(os.path.join(out, 'gated.log'))
  assert b['population_vmap']['gated']['vmap']['2']['members_images_per_s'] > 0


@pytest.mark.slow
def test_gpu_check_call_c_reproduces_as_one_population(tmp_path):
  out, work = str(tmp_path / 'out'), str(tmp_path / 'work')
  args = ['benchmarks/gpu_check.py', '--smoke', '--out', out, '--work', work, '--call', 'C']
  done = _json_line(*args, '--seeds', '0,1')['reproduce_vectorized']
  assert done['returncode'] == 0
  assert sorted(done['finished']) == [
    f'seed{s}/{k}' for s in (0, 1) for k in ('control', 'gated', 'plain')
  ]
  assert done['finished']['seed1/gated']['step'] == 6
  summary = done['summary']
  assert summary['seeds'] == [0, 1] and 'ci95' in summary['gated_minus_control']
  assert os.path.isdir(os.path.join(work, 'reproduce', 'population', 'control'))


SIGTERM_CHILD = """
import signal, sys, time
def stop(*_):
  open(sys.argv[1], 'w').write('checkpointed'); sys.exit(143)
signal.signal(signal.SIGTERM, stop if sys.argv[2] == 'obeys' else signal.SIG_IGN)
print('ready', flush=True)
time.sleep(60)
"""


def test_gpu_check_stops_a_command_at_its_deadline_and_kills_one_that_ignores_it(tmp_path):
  spec = importlib.util.spec_from_file_location('gpu_check', f'{REPO}/benchmarks/gpu_check.py')
  gpu_check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpu_check)

  def run(behaviour):
    marker = str(tmp_path / behaviour)
    command = [sys.executable, '-c', SIGTERM_CHILD, marker, behaviour]
    started = time.time()
    # The child is ready well within the deadline: the SIGTERM reaches its handler.
    code = gpu_check._run_until(behaviour, command, str(tmp_path), seconds=4, grace=1)
    return code, os.path.exists(marker), time.time() - started

  code, checkpointed, seconds = run('obeys')
  assert (code, checkpointed) == (143, True) and seconds < 15
  code, checkpointed, seconds = run('ignores')
  assert (code, checkpointed) == (-signal.SIGKILL, False) and seconds < 15
  assert 'ready' in open(tmp_path / 'obeys.log').read()


@pytest.mark.slow
def test_gpu_check_call_d_trains_bas_and_plain_then_analyzes_the_bas_run(tmp_path):
  out, work = str(tmp_path / 'out'), str(tmp_path / 'work')
  d = _json_line('benchmarks/gpu_check.py', '--smoke', '--out', out, '--work', work, '--call', 'D')
  assert d['bas_bas_train'] == d['bas_plain_train'] == {'returncode': 0}
  assert d['bas_bas']['step'] == d['bas_plain']['step'] == 6
  assert 'gate_density' in d['bas_bas']['eval'] and 'gate_density' not in d['bas_plain']['eval']
  census = d['bas_analyze']['census']
  assert sum(census[k] for k in ('always_on', 'always_off', 'input_dependent')) == 112
  assert len(d['bas_tradeoff']['rows']) == 6  # the default thresholds


@pytest.mark.slow
def test_bas_gradients_compares_both_reductions_with_the_cross_entropy():
  out = _json_line(
    'benchmarks/bas_gradients.py', '--config', 'experiments/default.py:bas', '--batches', '1',
    '--batch_size', '16',
  )  # fmt: skip
  norms = out['gating_grad_norm']
  assert out['gates'] == 112 and all(v > 0 for v in norms.values())
  # The sum over the gates is exactly C times the mean: its gradient too.
  assert norms['sum'] / norms['mean'] == pytest.approx(out['gates'], rel=1e-3)
  ratio = out['ratio_to_cross_entropy']
  assert ratio['sum'] == pytest.approx(norms['sum'] / norms['cross_entropy'])


@pytest.mark.slow
def test_host_pipeline_times_the_streamed_pipeline_per_thread_setting():
  pytest.importorskip('tensorflow_datasets')
  out = _json_line(
    'benchmarks/host_pipeline.py', '--batch_size', '4', '--batches', '2', '--rounds', '2',
    '--image_size', '32', '--threads', 'auto,0,1',
  )  # fmt: skip
  assert set(out['images_per_s']) == {'auto', '0', '1'} and out['image_size'] == 32
  assert all(len(r) == 2 and min(r) > 0 for r in out['round_images_per_s'].values())


@pytest.mark.slow
def test_gate_distribution_against_the_beta_prior(gated_run, tmp_path):
  from scipy import stats  # noqa: PLC0415

  workdir, _ = gated_run
  figure = tmp_path / 'gd.png'
  out = _json_line('benchmarks/gate_distribution.py', '--workdir', workdir, '--out', str(figure))
  assert out['workdir'] == workdir and out['examples'] > 0 and out['gates'] > 0
  assert sum(out['histogram']) == pytest.approx(1.0, abs=1e-3)
  # The prior's bins are the Beta(0.6, 0.4) CDF's differences (the default prior).
  assert out['prior'] == [0.6, 0.4]
  expected = np.diff(stats.beta.cdf(np.linspace(0, 1, 11), 0.6, 0.4))
  np.testing.assert_allclose(out['prior_histogram'], expected, atol=1e-4)
  tv = 0.5 * np.abs(np.array(out['histogram']) - expected).sum()
  assert out['total_variation'] == pytest.approx(tv, abs=1e-3)
  shares = out['input_dependent'] + out['always_on'] + out['always_off']
  assert shares == pytest.approx(1.0) and 0 <= out['density'] <= 1
  assert out['batch_shaping_loss'] > 0 and out['loss_batches'] >= 1
  assert figure.stat().st_size > 0


@pytest.mark.slow
def test_population_reports_every_size_and_member_map():
  out = _json_line(
    'benchmarks/population.py', '--config', 'experiments/default.py', '--variants', 'gated',
    '--members', '1,2', '--member_maps', 'sequential,vmap', '--steps', '1', '--rounds', '1',
    '--examples', '400',
  )  # fmt: skip
  assert out['backend'] == 'cpu' and out['default_member_map'] == 'sequential'
  for member_map in ('sequential', 'vmap'):
    one, two = out['gated'][member_map]['1'], out['gated'][member_map]['2']
    assert one['speedup_vs_k1'] == 1.0 and one['batch_size'] == 100
    assert two['members_images_per_s'] > 0 and two['compile_s'] > 0
    assert abs(two['per_member_images_per_s'] * 2 - two['members_images_per_s']) < 0.2
    # The speedup is computed from the unrounded throughputs, which are reported rounded to 0.1
    # images/s: it must lie within what those roundings allow (plus its own rounding to 0.001).
    m1, m2 = one['members_images_per_s'], two['members_images_per_s']
    low, high = (m2 - 0.05) / (m1 + 0.05), (m2 + 0.05) / (m1 - 0.05)
    assert low - 0.0005 <= two['speedup_vs_k1'] <= high + 0.0005
