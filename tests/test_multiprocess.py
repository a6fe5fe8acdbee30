"""Two local processes as two hosts (gloo collectives on 127.0.0.1): the multi-host path end to end,
through the `gaternet train` command, launched by hand as a user without a cluster manager would."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO, has_logged, load_experiment

from gaternet_jax import data as data_lib
from gaternet_jax.cpu import flags as cpu_flags
from gaternet_jax.training import checkpoints, restore


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


LAUNCH = textwrap.dedent("""
    import sys
    from gaternet_jax import main
    if sys.argv[1] == 'mock':
      import tensorflow_datasets as tfds
      with tfds.testing.mock_data(num_examples=48):
        main.main(['gaternet', 'train', *sys.argv[2:]])
    else:
      main.main(['gaternet', 'train', *sys.argv[2:]])
""")
STREAMED = [
  '--config.data.name=imagenet2012', '--config.data.image_size=16',
  '--config.data.shuffle_buffer=8', '--config.data.eval_split=validation',
]  # fmt: skip


def _launch(data, processes, devices, flags, script=LAUNCH):
  """`gaternet train FLAGS` (or `script DATA FLAGS`) as `processes` local hosts of `devices` CPU
  devices each."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {cpu_flags.CPU_XLA_FLAGS}')  # fmt: skip
  procs = []
  for i in range(processes):
    cluster = {}
    if processes > 1:
      cluster = dict(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))  # fmt: skip
    procs.append(
      subprocess.Popen(
        [sys.executable, '-c', script, data, *flags],
        cwd=REPO,
        env=dict(env, **cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return procs


def _finish(procs, timeout=900):
  """Every process's (returncode, stdout, stderr); kills them all if one hangs."""
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def _train(workdir, data, processes, devices, extra):
  """`gaternet train` of the default gated config on `processes` x `devices` CPU devices."""
  flags = [
    '--config', 'experiments/default.py', '--workdir', workdir, '--config.max_steps=4',
    '--config.batch_size=8', '--config.eval_batch_size=8', '--config.checkpoint_every_steps=2',
    '--config.log_every_steps=2', '--config.eval_every_epochs=100', *extra,
  ]  # fmt: skip
  finished = _finish(_launch(data, processes, devices, flags))
  for code, _, err in finished:
    assert code == 0, err[-3000:]
  return json.loads(finished[0][1].strip().splitlines()[-1])


# An evaluation whose per-batch program is nearly free, so the host runs as far ahead of the
# devices as the loop lets it: the pace at which XLA:CPU deadlocked (dispatch.InFlight).
EVALUATE_FAST_BATCHES = textwrap.dedent("""
    import sys
    from gaternet_jax import environment
    environment.prepare()
    import jax, jax.numpy as jnp
    from gaternet_jax import data
    from gaternet_jax.training import dispatch, distributed, steps
    from experiments import default
    distributed.initialize()
    config = default.get_config('plain')
    config.eval_batch_size = 4
    dataset = data.load_dataset(config.data, process_index=jax.process_index(),
      process_count=jax.process_count(), devices_per_process=jax.local_device_count())
    setup = steps.build(config, dataset.info)
    evaluator = dispatch.Evaluator(setup, dataset, loop=False)

    def sums(state, batch, threshold):
      mask, pixels = batch['mask'], batch['image'][..., 0].astype(jnp.float32)
      return {'count': jnp.sum(mask), 'loss': jnp.sum(pixels * mask[:, None, None]),
              'top1_correct': jnp.sum(batch['label'] * mask), 'top5_correct': jnp.sum(mask),
              'gate_counts': jnp.sum(pixels * mask[:, None, None], axis=(0, 1))}

    evaluator._batch_fn = jax.jit(sums, out_shardings=setup.replicated)
    for _ in range(int(sys.argv[1])):
      totals = evaluator.totals(None, 'test')
    print(int(totals['count']), int(totals['top1_correct']))
""")


@pytest.mark.slow
def test_evaluation_of_many_batches_on_two_processes_of_two_devices_does_not_deadlock():
  """10 evaluations of 75 batches each on 2 processes x 2 devices (the CPU's one call per batch)
  finish with every example counted once on both hosts. Before `dispatch.InFlight` bounded
  the dispatches in flight, this hung in each of 4 runs with CI's pytest options."""
  procs = _launch('10', 2, 2, [], script=EVALUATE_FAST_BATCHES)
  try:
    finished = _finish(procs, timeout=120)
  except subprocess.TimeoutExpired:
    pytest.fail('the per-batch evaluation on 2 processes x 2 devices deadlocked')
  for code, _, err in finished:
    assert code == 0, err[-3000:]
  outputs = {out.strip().splitlines()[-1] for _, out, _ in finished}
  assert len(outputs) == 1, outputs  # both hosts hold the same totals
  _, test_labels = data_lib.load_dataset(load_experiment('default').data).eval_arrays('test')
  assert outputs.pop() == f'{len(test_labels)} {int(np.sum(test_labels))}'


@pytest.mark.slow
@pytest.mark.parametrize('data', ['memory', 'mock'])
def test_gated_procedure_on_two_processes_matches_one(tmp_path, data):
  """The three stages through `gaternet train` on 2 processes x 2 devices, launched by hand
  (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), end as on 1 process x 4."""
  if data == 'mock':
    pytest.importorskip('tensorflow_datasets')
  extra = STREAMED if data == 'mock' else []
  # In memory, the two processes run 2 steps per dispatch and the one process 1 step per call;
  # they also space checkpoints so far apart that only the last step of each stage is saved: a
  # save is collective, so process 0's clock must decide for both (else a save would hang).
  spaced = ['--config.steps_per_dispatch=2', '--config.checkpoint_min_interval_s=1e6']
  two = _train(str(tmp_path / 'two'), data, 2, 2, extra or spaced)
  for stage in ('stage1_backbone', 'stage2_gater', 'stage3_joint'):
    assert os.path.exists(tmp_path / 'two' / stage / 'results.json'), stage
    if not extra:
      assert checkpoints.steps(str(tmp_path / 'two' / stage)) == [4], stage
  assert two['step'] == 4 and two['stage'] == 'stage3_joint' and two['eval']['examples'] > 0
  if data == 'mock':
    # tf.data streams each process its own files: another data order than one process's, so
    # there is no one-process run to match; the three stages completed with finite metrics.
    assert all(math.isfinite(two['eval'][k]) for k in ('loss', 'top1_error', 'gate_density'))
    return
  one = _train(str(tmp_path / 'one'), data, 1, 4, extra)
  assert one['step'] == 4 and two['eval']['examples'] == one['eval']['examples']
  # In memory, each device trains on the same examples whatever the process layout.
  for key in ('loss', 'top1_error', 'gate_density'):
    assert abs(two['eval'][key] - one['eval'][key]) <= 1e-3 * max(1.0, abs(one['eval'][key])), key


SWEEP = textwrap.dedent("""
    import sys
    from gaternet_jax import main
    main.main(['gaternet', 'sweep', *sys.argv[2:]])
""")


@pytest.mark.slow
def test_a_vectorized_grid_on_two_processes_matches_one(tmp_path):
  """`gaternet sweep --vectorize` on 2 processes x 2 devices: the hosts agree on the stored
  population and checkpoints (JSON records, not only numbers) and end as 1 process x 4 does."""

  def sweep(workdir, processes, devices):
    flags = [
      '--config', 'experiments/default.py:plain', '--workdir', workdir, '--sweep', 'seed=0,1',
      '--vectorize', '--config.max_steps=4', '--config.batch_size=8', '--config.eval_batch_size=8',
      '--config.checkpoint_every_steps=2', '--config.log_every_steps=2',
      '--config.eval_every_epochs=100', '--config.checkpoint_min_interval_s=1e6',
    ]  # fmt: skip
    finished = _finish(_launch('memory', processes, devices, flags, script=SWEEP))
    for code, _, err in finished:
      assert code == 0, err[-3000:]
    return [json.loads(line) for line in finished[0][1].splitlines() if line.startswith('{')]

  two = sweep(str(tmp_path / 'two'), 2, 2)
  one = sweep(str(tmp_path / 'one'), 1, 4)
  assert [r['point'] for r in two] == [{'seed': '0'}, {'seed': '1'}]
  for a, b in zip(two, one, strict=True):
    assert a['step'] == b['step'] == 4
    for key in ('loss', 'top1_error'):
      assert abs(a['eval'][key] - b['eval'][key]) <= 1e-3 * max(1.0, abs(b['eval'][key])), key
  assert os.path.exists(tmp_path / 'two' / 'sweep.md')


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_at_one_step_and_resumes(tmp_path):
  """A preemption notice reaching one host (SIGTERM to process 1 only) in the procedure's joint
  stage, after both processes ran stages 1 and 2 (so the preemption service's ids have passed
  through two earlier loops): both stop after the same step, write that step's checkpoint once
  and exit 143; the same command on both then resumes the joint stage from it and finishes."""
  workdir = str(tmp_path / 'w')
  joint = os.path.join(workdir, 'stage3_joint')
  flags = [
    '--config', 'experiments/default.py', '--workdir', workdir, '--config.max_steps=20',
    '--config.batch_size=8', '--config.eval_batch_size=8', '--config.log_every_steps=5',
    '--config.eval_every_epochs=100', '--config.checkpoint_every_steps=1000',
  ]  # fmt: skip
  procs = _launch('memory', 2, 1, flags)

  deadline = time.time() + 600
  while not has_logged(joint):  # the joint stage is under way
    assert time.time() < deadline and all(p.poll() is None for p in procs), 'no joint stage'
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  stopped = _finish(procs, timeout=300)
  lines = []
  for code, _, err in stopped:
    assert code == 143, err[-3000:]
    lines += [l for l in err.splitlines() if l.startswith('gaternet: stopped by SIGTERM at step')]
  assert len(lines) == 2 and lines[0] == lines[1], lines  # the same step on both hosts
  assert f'checkpoint written to {joint}' in lines[0]
  step = int(lines[0].split('at step ')[1].split(';')[0])
  assert 0 < step < 20 and restore.checkpoints.steps(joint) == [step]
  resumed = _finish(_launch('memory', 2, 1, flags))
  for code, _, err in resumed:
    assert code == 0, err[-3000:]
  assert f'Resumed {joint} from step {step}' in resumed[0][2]
  results = json.loads(resumed[0][1].strip().splitlines()[-1])
  assert results['stage'] == 'stage3_joint' and results['step'] == 20
