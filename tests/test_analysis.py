"""Tests of gaternet_jax.analysis on constructed gate matrices whose answers are known."""

from __future__ import annotations

import ast
import itertools
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from etils import epath

from gaternet_jax import analysis
from gaternet_jax.errors import UserError
from gaternet_jax.layout import GatedLayer

# 8 + 5 + 6 = 19 gates: not a multiple of 8, so bit-packing has a ragged last byte.
LAYOUT = (
  GatedLayer('stage1/unit1', 8, 10),
  GatedLayer('stage2/unit1', 5, 100),
  GatedLayer('stage3/unit1', 6, 1000),
)
# Per layer: (always on, always off, input-dependent), adding up to the layer's filters.
KNOWN_CENSUS = ((3, 4, 1), (1, 0, 4), (0, 2, 4))


def _census_gates(n: int = 12, seed: int = 0) -> np.ndarray:
  """Gates with exactly KNOWN_CENSUS, the gate types shuffled within each layer."""
  rng = np.random.default_rng(seed)
  columns = []
  for (on, off, dependent), layer in zip(KNOWN_CENSUS, LAYOUT):
    assert on + off + dependent == layer.filters
    layer_columns = [np.ones(n, bool)] * on + [np.zeros(n, bool)] * off
    for _ in range(dependent):
      # On for between 1 and n - 1 examples, so neither always on nor always off.
      column = np.zeros(n, bool)
      column[rng.choice(n, size=rng.integers(1, n), replace=False)] = True
      layer_columns.append(column)
    columns.extend(layer_columns[i] for i in rng.permutation(layer.filters))
  return np.stack(columns, axis=1)


def _structured_gates(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random gates whose input-dependent part depends on the label, as a trained gater's would."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  class_probs = rng.random((num_classes, 19))
  gates = rng.random((n, 19)) < class_probs[labels]
  gates[:, :3] = True
  gates[:, 3:6] = False
  return gates, labels


def test_census_is_exact_and_adds_up():
  gates = _census_gates()
  census = analysis.gate_census(gates, LAYOUT)
  assert [layer['name'] for layer in census] == [layer.name for layer in LAYOUT]
  assert [layer['index'] for layer in census] == [1, 2, 3]
  for layer, expected, spec in zip(census, KNOWN_CENSUS, LAYOUT):
    assert (layer['always_on'], layer['always_off'], layer['input_dependent']) == expected
    assert layer['filters'] == spec.filters
    assert layer['always_on'] + layer['always_off'] + layer['input_dependent'] == spec.filters
  assert analysis.census_totals(census) == {
    'filters': 19,
    'always_on': 4,
    'always_off': 6,
    'input_dependent': 9,
  }
  # uint8 and float 0/1 input give the same census as bool.
  assert analysis.gate_census(gates.astype(np.uint8), LAYOUT) == census
  assert analysis.gate_census(gates.astype(np.float32), LAYOUT) == census


def test_single_example_has_no_input_dependent_gates():
  gates = _census_gates()[:1]
  totals = analysis.census_totals(analysis.gate_census(gates, LAYOUT))
  assert totals['input_dependent'] == 0
  assert totals['always_on'] == int(gates.sum())


def test_per_example_and_firing_counts():
  gates = _census_gates(n=30, seed=3)
  np.testing.assert_array_equal(analysis.gates_on_per_example(gates), gates.sum(axis=1))
  np.testing.assert_array_equal(analysis.firing_counts(gates), gates.sum(axis=0))
  assert analysis.gates_on_per_example(gates).dtype == np.int64


def test_input_dependent_firing_bounds_are_inclusive():
  n = 100
  wanted = [0, 1, 2, 7, 50, 98, 99, 100]
  gates = np.stack([np.arange(n) < k for k in wanted], axis=1)
  firing = analysis.input_dependent_firing(gates)
  np.testing.assert_array_equal(firing['indices'], [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(firing['counts'], [1, 2, 7, 50, 98, 99])
  assert firing['num_input_dependent'] == 6
  assert (firing['low_count'], firing['high_count']) == (1, 99)
  assert firing['num_between'] == 6  # 1 and 99 are on the inclusive bounds.
  firing = analysis.input_dependent_firing(gates, low=0.02, high=0.98)
  assert (firing['low_count'], firing['high_count'], firing['num_between']) == (2, 98, 4)
  # 0.07 * 100 is 7.000000000000001 in floating point; 7 must still count as inside.
  firing = analysis.input_dependent_firing(gates, low=0.07, high=0.5)
  assert (firing['low_count'], firing['high_count'], firing['num_between']) == (7, 50, 2)
  with pytest.raises(UserError):
    analysis.input_dependent_firing(gates, low=0.6, high=0.5)


def test_paper_bounds_for_ten_thousand_examples():
  gates = np.zeros((10_000, 4), bool)
  for column, count in enumerate([99, 100, 9_900, 9_901]):
    gates[:count, column] = True
  firing = analysis.input_dependent_firing(gates)
  assert (firing['low_count'], firing['high_count'], firing['num_between']) == (100, 9_900, 2)


@pytest.mark.parametrize('dtype', [np.bool_, np.uint8])
def test_save_load_round_trip(tmp_path, dtype):
  gates = _census_gates(n=21).astype(dtype)
  labels = np.arange(21) % 4
  path = tmp_path / 'sub' / 'gates_file'  # No .npz suffix: must be written to exactly this path.
  analysis.save_gates(path, gates, labels, LAYOUT)
  assert path.exists() and list(path.parent.iterdir()) == [path]
  loaded_gates, loaded_labels, loaded_layout = analysis.load_gates(path)
  assert loaded_gates.dtype == np.bool_ and loaded_gates.shape == (21, 19)
  np.testing.assert_array_equal(loaded_gates, gates.astype(bool))
  np.testing.assert_array_equal(loaded_labels, labels)
  assert loaded_layout == list(LAYOUT)
  assert all(type(layer.filters) is int for layer in loaded_layout)


def test_load_rejects_missing_and_corrupt_files(tmp_path):
  with pytest.raises(UserError, match='not found'):
    analysis.load_gates(tmp_path / 'missing.npz')
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not a zip file')
  with pytest.raises(UserError):
    analysis.load_gates(bad)
  np.savez(tmp_path / 'other.npz', x=np.zeros(3))
  with pytest.raises(UserError):
    analysis.load_gates(tmp_path / 'other.npz')


def test_inputs_are_validated():
  gates = _census_gates()
  with pytest.raises(UserError, match='columns'):
    analysis.gate_census(gates[:, :-1], LAYOUT)
  with pytest.raises(UserError, match='only 0 and 1'):
    analysis.gate_census(gates * 0.5, LAYOUT)
  with pytest.raises(UserError, match='only 0 and 1'):
    analysis.gate_census(-gates.astype(np.int8), LAYOUT)
  with pytest.raises(UserError, match='only 0 and 1'):
    analysis.gate_census(gates.astype(np.uint8) * 2, LAYOUT)
  with pytest.raises(UserError, match='2-D'):
    analysis.firing_counts(gates[0])
  with pytest.raises(UserError, match='no examples'):
    analysis.firing_counts(gates[:0])
  with pytest.raises(UserError, match='labels'):
    analysis.class_similarity(gates, np.zeros(3, int))


def _brute_force_similarity(gates: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  same, different = [], []
  for i, j in itertools.combinations(range(len(labels)), 2):
    distance = np.mean(gates[i] != gates[j])
    (same if labels[i] == labels[j] else different).append(distance)
  return float(np.mean(same)), float(np.mean(different))


def test_class_similarity_matches_brute_force():
  rng = np.random.default_rng(7)
  n = 45
  labels = rng.choice([2, 5, 9, 11], size=n)  # Non-contiguous labels.
  gates = rng.random((n, 13)) < rng.random(13)
  result = analysis.class_similarity(gates, labels)
  within, between = _brute_force_similarity(gates, labels)
  assert result['within'] == pytest.approx(within, rel=1e-12)
  assert result['between'] == pytest.approx(between, rel=1e-12)
  sizes = np.bincount(labels)
  assert result['within_pairs'] == sum(int(s) * (int(s) - 1) // 2 for s in sizes)
  assert result['within_pairs'] + result['between_pairs'] == n * (n - 1) // 2
  for entry in result['per_class']:
    members = gates[labels == entry['label']]
    assert entry['count'] == len(members)
    expected = np.mean(
      [np.mean(members[i] != members[j]) for i, j in itertools.combinations(range(len(members)), 2)]
    )
    assert entry['within'] == pytest.approx(expected, rel=1e-12)


def test_class_similarity_without_pairs():
  gates = np.array([[1, 0], [0, 1]], bool)
  result = analysis.class_similarity(gates, np.array([0, 1]))
  assert result['within'] is None and result['between'] == 1.0
  result = analysis.class_similarity(gates, np.array([3, 3]))
  assert result['between'] is None and result['within'] == 1.0


def test_per_class_usage_is_exact():
  layout = (GatedLayer('a', 2, 1), GatedLayer('b', 4, 1))
  gates = np.array([[1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], np.uint8)
  usage = analysis.per_class_usage(gates, np.array([0, 0, 2]), layout, num_classes=3)
  np.testing.assert_allclose(usage[0], [3 / 4, 4 / 8])
  assert np.all(np.isnan(usage[1]))  # No examples of class 1.
  np.testing.assert_allclose(usage[2], [0.0, 1 / 4])
  with pytest.raises(UserError):
    analysis.per_class_usage(gates, np.array([0, 0, 3]), layout, num_classes=3)


def test_compute_used_is_exact():
  # Gated filters cost 8*10 + 5*100 + 6*1000 = 6580 of the backbone's 10_000 MACs.
  gates = np.zeros((3, 19), bool)
  gates[1] = True
  gates[2, [0, 8, 13, 14]] = True  # One filter on in layer 1 and 2, two in layer 3.
  used = analysis.macs_per_example(gates, LAYOUT, backbone_macs=10_000, gater_macs=7)
  np.testing.assert_array_equal(
    used, [10_000 - 6580 + 7, 10_007, 10_000 - 6580 + 10 + 100 + 2000 + 7]
  )
  result = analysis.compute_used(gates, LAYOUT, backbone_macs=10_000, gater_macs=7)
  assert result['backbone_macs'] == 10_000 and result['gater_macs'] == 7
  assert result['gated_macs'] == 6580
  assert result['min'] == 3427 and result['max'] == 10_007
  assert result['mean'] == pytest.approx(np.mean(used))
  assert result['std'] == pytest.approx(np.std(used))
  assert result['mean_backbone_part'] == pytest.approx(np.mean(used) - 7)
  assert result['fraction'] == pytest.approx(np.mean(used) / 10_000)
  with pytest.raises(UserError, match='more than the whole backbone'):
    analysis.compute_used(gates, LAYOUT, backbone_macs=1000, gater_macs=0)


@pytest.mark.slow
def test_embedding_is_deterministic_and_handles_tiny_inputs():
  gates, _ = _structured_gates(40, 3)
  first = analysis.embed_gates(gates, seed=1, max_examples=25)
  second = analysis.embed_gates(gates, seed=1, max_examples=25)
  assert first.shape == (25, 2) and np.all(np.isfinite(first))
  np.testing.assert_array_equal(first, second)
  np.testing.assert_array_equal(
    analysis.embedding_subset(40, 25, 1), analysis.embedding_subset(40, 25, 1)
  )
  assert analysis.embed_gates(gates[:3]).shape == (3, 2)
  assert analysis.embed_gates(gates[:2]) is None
  assert analysis.embed_gates(np.ones((10, 5), bool)) is None
  assert 'identical' in analysis.embedding_skip_reason(np.ones((10, 5), bool))
  assert 'fewer than 3' in analysis.embedding_skip_reason(np.ones((2, 5), bool))
  # A single gate column that varies: PCA gives one dimension, t-SNE must still run.
  assert analysis.embed_gates(np.array([[0], [1], [0], [1]], bool)).shape == (4, 2)


def _check_outputs(out_dir: pathlib.Path, result: dict) -> dict:
  for name in analysis.FIGURE_FILES:
    png = out_dir / name
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name
  with open(out_dir / analysis.JSON_FILE) as f:
    loaded = json.load(f)
  assert loaded == result
  return loaded


def test_analyze_writes_everything(tmp_path):
  gates, labels = _structured_gates(90, 4, seed=2)
  names = ['cat', 'dog', 'ship', 'truck']
  out_dir = tmp_path / 'new' / 'analysis'
  result = analysis.analyze(
    gates,
    labels,
    LAYOUT,
    out_dir=out_dir,
    model_name='ResNet-test',
    split='test',
    backbone_macs=10_000,
    gater_macs=50,
    class_names=names,
    max_embed_examples=60,
    seed=0,
  )
  loaded = _check_outputs(out_dir, result)
  assert loaded['num_examples'] == 90 and loaded['num_gates'] == 19
  assert loaded['census']['totals']['filters'] == 19
  assert loaded['census']['totals']['always_on'] >= 3
  assert loaded['census']['totals']['always_off'] >= 3
  assert loaded['gates_per_example']['max'] == int(gates.sum(axis=1).max())
  assert loaded['embedding']['status'] == 'ok' and loaded['embedding']['num_points'] == 60
  assert np.array(loaded['per_class_usage']['matrix']).shape == (4, 3)
  assert loaded['class_similarity']['within'] < loaded['class_similarity']['between']
  assert loaded['compute']['max'] <= 10_050
  saved_gates, saved_labels, saved_layout = analysis.load_gates(out_dir / analysis.GATES_FILE)
  np.testing.assert_array_equal(saved_gates, gates)
  np.testing.assert_array_equal(saved_labels, labels)
  assert saved_layout == list(LAYOUT)


def test_analyze_degenerate_inputs_do_not_crash(tmp_path):
  gates = np.tile(_census_gates()[0], (20, 1))  # Every example has the same gate vector.
  result = analysis.analyze(
    gates,
    np.zeros(20, int),
    LAYOUT,
    out_dir=tmp_path / 'same',
    model_name='m',
    split='test',
    backbone_macs=10_000,
    gater_macs=0,
  )
  loaded = _check_outputs(tmp_path / 'same', result)
  assert loaded['embedding']['status'] == 'skipped'
  assert 'identical' in loaded['embedding']['reason']
  assert loaded['census']['totals']['input_dependent'] == 0
  assert loaded['firing']['num_input_dependent'] == 0
  assert loaded['class_similarity']['between'] is None
  # Two examples, an empty class (NaN usage row -> null) and the embedding switched off.
  result = analysis.analyze(
    _census_gates()[:2],
    np.array([0, 2]),
    LAYOUT,
    out_dir=tmp_path / 'two',
    model_name='m',
    split='val',
    backbone_macs=10_000,
    gater_macs=0,
    max_embed_examples=0,
  )
  loaded = _check_outputs(tmp_path / 'two', result)
  assert loaded['per_class_usage']['matrix'][1] == [None, None, None]
  assert loaded['embedding']['status'] == 'skipped'


@pytest.mark.parametrize('as_type', [epath.Path, str])
def test_storage_and_analyze_accept_epath_and_str(tmp_path, as_type):
  gates, labels = _census_gates(n=16), np.arange(16) % 3
  gates_path = as_type(tmp_path / 'gates_dir' / analysis.GATES_FILE)
  analysis.save_gates(gates_path, gates, labels, LAYOUT)
  loaded_gates, loaded_labels, loaded_layout = analysis.load_gates(gates_path)
  np.testing.assert_array_equal(loaded_gates, gates)
  np.testing.assert_array_equal(loaded_labels, labels)
  assert loaded_layout == list(LAYOUT)
  # The temporary file of the atomic write is renamed away, not left beside gates.npz.
  assert sorted(p.name for p in (tmp_path / 'gates_dir').iterdir()) == [analysis.GATES_FILE]

  out_dir = tmp_path / 'out' / 'analysis'
  result = analysis.analyze(
    gates,
    labels,
    LAYOUT,
    out_dir=as_type(out_dir),
    model_name='m',
    split='test',
    backbone_macs=10_000,
    gater_macs=0,
    max_embed_examples=0,
  )
  _check_outputs(out_dir, result)
  assert sorted(p.name for p in out_dir.iterdir()) == sorted(
    [analysis.GATES_FILE, analysis.JSON_FILE, *analysis.FIGURE_FILES]
  )
  loaded_gates, loaded_labels, loaded_layout = analysis.load_gates(
    as_type(out_dir / analysis.GATES_FILE)
  )
  np.testing.assert_array_equal(loaded_gates, gates)
  np.testing.assert_array_equal(loaded_labels, labels)
  assert loaded_layout == list(LAYOUT)


def test_module_imports_no_deep_learning_framework_or_pyplot():
  # collect.py is the command's layer that restores a checkpoint and runs the model (JAX); the
  # statistics, figures and storage must work on saved gates on any machine.
  files = sorted(
    f for f in pathlib.Path(analysis.__file__).parent.glob('*.py') if f.name != 'collect.py'
  )
  assert {f.name for f in files} >= {
    '__init__.py',
    'embedding.py',
    'figures.py',
    'stats.py',
    'storage.py',
  }
  imported = set()
  for node in itertools.chain.from_iterable(ast.walk(ast.parse(f.read_text())) for f in files):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module)
  roots = {name.split('.')[0] for name in imported}
  assert not roots & {'jax', 'flax', 'tensorflow', 'torch'}
  assert 'matplotlib.pyplot' not in imported


@pytest.mark.slow
def test_analyze_runs_without_importing_a_framework(tmp_path):
  # gaternet_jax.models' package __init__ imports flax and jax; analysing gates must not need them
  # (or pyplot's global state), so check in a fresh interpreter what analyze() actually imports.
  script = textwrap.dedent(f"""
      import collections, sys
      import numpy as np
      from gaternet_jax import analysis
      Layer = collections.namedtuple('Layer', 'name filters macs_per_filter')
      layout = [Layer('a', 3, 10), Layer('b', 2, 20)]
      gates = np.random.default_rng(0).random((12, 5)) < 0.5
      analysis.analyze(gates, np.arange(12) % 2, layout, out_dir={str(tmp_path)!r},
                       model_name='m', split='test', backbone_macs=1000, gater_macs=0,
                       max_embed_examples=0)
      bad = sorted(m for m in sys.modules
                   if m.split('.')[0] in ('jax', 'flax', 'tensorflow', 'torch')
                   or m == 'matplotlib.pyplot')
      print(bad)
  """)
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
    [sys.executable, '-c', script],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
  )
  assert out.stdout.strip() == '[]', out.stdout
  assert (tmp_path / analysis.JSON_FILE).exists()


def test_tradeoff_labels_of_nearby_thresholds_do_not_overlap():
  from gaternet_jax.analysis import figures  # noqa: PLC0415

  # The real λ=1.0 curve (docs/results.md): T = 0, -0.5 and -1 land a few pixels apart.
  points = [(-4, 79.7, 65.6), (-2, 67.5, 39.1), (-1, 63.7, 37.8), (-0.5, 62.7, 36.7),
            (0, 62.0, 36.6), (0.5, 61.5, 38.2), (1, 61.0, 43.5), (2, 60.5, 59.2)]  # fmt: skip
  rows = [{'threshold': t, 'macs': m * 1e6, 'top1_error': e} for t, m, e in points]
  fig = figures.tradeoff_figure(
    rows, model_name='m', split='holdout', num_examples=10, plain_macs=40.5e6, plain_error=35.8
  )
  fig.draw_without_rendering()
  renderer = fig.canvas.get_renderer()
  texts = [t for t in fig.axes[0].texts if t.get_text().startswith('T=')]
  assert sorted(t.get_text() for t in texts) == sorted(f'T={t:g}' for t, _, _ in points)
  boxes = [t.get_window_extent(renderer) for t in texts]
  for a, b in itertools.combinations(boxes, 2):
    assert not a.overlaps(b)
  frame = fig.axes[0].get_window_extent(renderer)
  assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)  # T=-4 sits at the right edge
