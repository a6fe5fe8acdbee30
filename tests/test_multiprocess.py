"""Two local processes as two hosts (gloo collectives on 127.0.0.1): the multi-host path end to end."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from gaternet_jax import environment

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{sys.argv[1]}', num_processes=2, process_id=int(sys.argv[2]))
    sys.path.insert(0, 'tests')
    from conftest import tiny_default
    from gaternet_jax import procedure
    assert jax.process_count() == 2 and jax.device_count() == 2
    results = procedure.train_and_evaluate(tiny_default('plain', eval_batch_size=50), sys.argv[3])
    print(json.dumps({'process': jax.process_index(), 'step': results['step'],
                      'examples': results['eval']['examples'], 'loss': results['eval']['loss']}))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_evaluate_and_checkpoint(tmp_path):
  port, workdir = _free_port(), str(tmp_path / 'run')
  env = dict(os.environ, XLA_FLAGS=environment.CPU_XLA_FLAGS)
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', WORKER, str(port), str(i), workdir],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  # Both hosts agree; every one of the 297 test examples is counted once across the two hosts.
  assert {r['step'] for r in results} == {6}
  assert {r['examples'] for r in results} == {297}
  assert results[0]['loss'] == results[1]['loss']
  stored = json.load(open(os.path.join(workdir, 'results.json')))
  assert stored['step'] == 6
  assert any(d.isdigit() for d in os.listdir(os.path.join(workdir, 'checkpoints')))


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


def _train(workdir, data, processes, devices, extra):
  """`gaternet train` of the default gated config on `processes` x `devices` CPU devices."""
  port = _free_port()
  flags = [
    '--config', 'experiments/default.py', '--workdir', workdir, '--config.max_steps=4',
    '--config.batch_size=8', '--config.eval_batch_size=8', '--config.checkpoint_every_steps=2',
    '--config.log_every_steps=2', '--config.eval_every_epochs=100', *extra,
  ]  # fmt: skip
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {environment.CPU_XLA_FLAGS}')  # fmt: skip
  procs = []
  for i in range(processes):
    cluster = {}
    if processes > 1:
      cluster = dict(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))  # fmt: skip
    procs.append(
      subprocess.Popen(
        [sys.executable, '-c', LAUNCH, data, *flags],
        cwd=REPO,
        env=dict(env, **cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return json.loads(outputs[0][0].strip().splitlines()[-1])


@pytest.mark.parametrize('data', ['memory', 'mock'])
def test_gated_procedure_on_two_processes_matches_one(tmp_path, data):
  """The three stages through `gaternet train` on 2 processes x 2 devices, launched by hand
  (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), end as on 1 process x 4."""
  if data == 'mock':
    pytest.importorskip('tensorflow_datasets')
  extra = STREAMED if data == 'mock' else []
  two = _train(str(tmp_path / 'two'), data, 2, 2, extra)
  one = _train(str(tmp_path / 'one'), data, 1, 4, extra)
  for stage in ('stage1_backbone', 'stage2_gater', 'stage3_joint'):
    assert os.path.exists(tmp_path / 'two' / stage / 'results.json'), stage
  assert two['step'] == one['step'] == 4 and two['stage'] == 'stage3_joint'
  assert two['eval']['examples'] == one['eval']['examples'] > 0
  if data == 'mock':
    # tf.data streams each process its own files: another data order than one process's, so
    # only the outcome's completeness is compared.
    assert all(math.isfinite(two['eval'][k]) for k in ('loss', 'top1_error', 'gate_density'))
    return
  # In memory, each device trains on the same examples whatever the process layout.
  for key in ('loss', 'top1_error', 'gate_density'):
    assert abs(two['eval'][key] - one['eval'][key]) <= 1e-3 * max(1.0, abs(one['eval'][key])), key
