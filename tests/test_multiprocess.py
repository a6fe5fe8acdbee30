"""Two local processes as two hosts (gloo collectives on 127.0.0.1): the multi-host path end to end."""

import json
import os
import socket
import subprocess
import sys
import textwrap

from conftest import REPO

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{sys.argv[1]}', num_processes=2, process_id=int(sys.argv[2]))
    sys.path.insert(0, 'tests')
    from conftest import tiny_default
    from gaternet_jax import train
    assert jax.process_count() == 2 and jax.device_count() == 2
    results = train.train_and_evaluate(tiny_default('plain', eval_batch_size=50), sys.argv[3])
    print(json.dumps({'process': jax.process_index(), 'step': results['step'],
                      'examples': results['eval']['examples'], 'loss': results['eval']['loss']}))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_evaluate_and_checkpoint(tmp_path):
  port, workdir = _free_port(), str(tmp_path / 'run')
  env = dict(os.environ, XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=')
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
