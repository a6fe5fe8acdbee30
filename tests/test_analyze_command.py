"""`gaternet analyze` and `gaternet report` on real (tiny) runs."""

import json
import os

import numpy as np
import pytest

from gaternet_jax import analysis
from gaternet_jax.commands import report


@pytest.mark.slow
def test_analyze_a_trained_gaternet(gated_run, tmp_path, cli):
  workdir, _ = gated_run
  out = tmp_path / 'analysis'
  result = cli(
    'analyze',
    '--workdir',
    workdir,
    '--max-examples',
    '150',
    '--out',
    str(out),
    '--max-embed-examples',
    '100',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.load(open(out / 'analysis.json'))
  assert data['num_examples'] == 150 and data['num_gates'] == 112
  for layer in data['census']['layers']:
    assert layer['always_on'] + layer['always_off'] + layer['input_dependent'] == layer['filters']
  gates, labels, layout = analysis.load_gates(out / 'gates.npz')
  assert gates.shape == (150, 112) and labels.shape == (150,)
  per_example = gates.sum(axis=1)
  assert data['gates_per_example']['min'] == per_example.min()
  assert data['gates_per_example']['max'] == per_example.max()
  np.testing.assert_allclose(data['gates_per_example']['mean'], per_example.mean())
  assert [l.filters for l in layout] == [16, 32, 64]
  for name in analysis.FIGURE_FILES:
    assert (out / name).stat().st_size > 1000, name
  assert data['compute']['gater_macs'] > 0


@pytest.mark.slow
def test_analyze_without_checkpoint_fails_with_one_line(tmp_path, cli):
  result = cli('analyze', '--workdir', str(tmp_path))
  errors = [l for l in result.stderr.splitlines() if l.startswith('gaternet: error:')]
  assert result.returncode == 2 and len(errors) == 1 and 'no checkpoint' in errors[0]
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_report_table(gated_run, tmp_path, cli):
  workdir, _ = gated_run
  stage1 = os.path.join(workdir, 'stage1_backbone')
  table = report.make_table([stage1, workdir])
  lines = table.splitlines()
  assert len(lines) == 4 and lines[0].startswith('| Model')
  assert '-Gated' in lines[3] and '112' in lines[3]
  result = cli('report', stage1, workdir, '--out', str(tmp_path / 't.md'))
  assert result.returncode == 0 and (tmp_path / 't.md').read_text().strip() == table
  bad = cli('report', str(tmp_path))
  assert bad.returncode == 2 and 'no results.json' in bad.stderr
