"""`gaternet sweep`'s summary: the table and the figure of every point (commands/sweep.py)."""

import matplotlib.pyplot  # noqa: F401 - the same backend as the other figure tests
import pytest

from gaternet_jax.analysis import figures
from gaternet_jax.commands import sweep


def _summary(points):
  rows = [
    {
      'point': point,
      'workdir': ','.join(f'{k}={v}' for k, v in point.items()),
      'step': 10,
      'top1_error': error,
      'top5_error': 1.0,
      'gate_density': density,
      'macs': macs,
      'split': 'holdout',
    }
    for point, error, density, macs in points
  ]
  return {'name': 'cifar10_resnet20', 'split': 'holdout', 'fields': list(points[0][0]),
          'points': rows}  # fmt: skip


LAMBDA = _summary([
  ({'gating.l1_weight': '0'}, 15.1, 0.898, 40.1e6),
  ({'gating.l1_weight': '0.003'}, 15.4, 0.61, 27.5e6),
  ({'gating.l1_weight': '0.1'}, 17.9, 0.05, 4.0e6),
])  # fmt: skip


def test_the_table_has_one_row_per_point_in_grid_order():
  lines = sweep.markdown(LAMBDA).splitlines()
  assert lines[0] == 'cifar10_resnet20: 3 points, holdout split'
  assert lines[2] == '| gating.l1_weight | top-1 error (%) | gates on | MACs used (M) | step |'
  assert lines[4:] == [
    '| 0 | 15.10 | 89.8% | 40.10 | 10 |',
    '| 0.003 | 15.40 | 61.0% | 27.50 | 10 |',
    '| 0.1 | 17.90 | 5.0% | 4.00 | 10 |',
  ]


def test_one_numeric_axis_spanning_decades_from_zero_is_plotted_over_a_symlog_axis():
  fig = figures.sweep_figure(LAMBDA, sweep.split_words(LAMBDA))
  errors, macs = fig.axes
  assert errors.get_xscale() == macs.get_xscale() == 'symlog'
  assert list(errors.lines[0].get_xdata()) == [0.0, 0.003, 0.1]
  assert list(errors.lines[0].get_ydata()) == [15.1, 15.4, 17.9]
  assert list(macs.lines[0].get_ydata()) == pytest.approx([40.1, 27.5, 4.0])
  assert [t.get_text() for t in errors.texts] == ['90% on', '61% on', '5% on']


def test_a_grid_of_two_axes_or_text_values_is_one_labelled_point_each():
  grid = _summary([
    ({'seed': '0', 'gating.binarizer': 'semhash'}, 15.0, 0.8, 30e6),
    ({'seed': '0', 'gating.binarizer': 'gumbel'}, 16.0, 0.7, 28e6),
  ])  # fmt: skip
  errors, _ = figures.sweep_figure(grid, sweep.split_words(grid)).axes
  assert errors.get_xscale() == 'linear'
  assert [t.get_text() for t in errors.get_xticklabels()] == [
    'seed=0, gating.binarizer=semhash', 'seed=0, gating.binarizer=gumbel',
  ]  # fmt: skip
  near = _summary([({'optimizer.learning_rate': v}, 10.0, 1.0, 40e6) for v in ('0.05', '0.1')])
  assert figures.sweep_figure(near, sweep.split_words(near)).axes[0].get_xscale() == 'linear'


def test_a_curve_is_drawn_in_the_fields_order_whatever_the_grid_order():
  shuffled = dict(LAMBDA, points=[LAMBDA['points'][i] for i in (2, 0, 1)])
  errors, _ = figures.sweep_figure(shuffled, sweep.split_words(shuffled)).axes
  assert list(errors.lines[0].get_xdata()) == [0.0, 0.003, 0.1]
  assert list(errors.lines[0].get_ydata()) == [15.1, 15.4, 17.9]
  assert sweep.markdown(shuffled).splitlines()[4].startswith('| 0.1 |')  # the table: grid order


def test_a_grid_over_the_evaluation_split_says_so():
  grid = _summary([({'data.eval_split': v}, 10.0, 1.0, 40e6) for v in ('holdout', 'test')])
  grid['split'] = None
  assert sweep.markdown(grid).splitlines()[0] == "cifar10_resnet20: 2 points, each point's split"
  assert (
    figures.sweep_figure(grid, sweep.split_words(grid)).axes[0].get_ylabel()
    == "top-1 error (%), each point's split"
  )


def test_a_cached_final_evaluation_is_read_under_either_name(tmp_path, monkeypatch):
  from gaternet_jax.commands import evaluate  # noqa: PLC0415
  from gaternet_jax.training import workdir as workdir_lib  # noqa: PLC0415

  monkeypatch.setattr(evaluate, 'evaluate_workdir', lambda d: {'step': 6, 'top1_error': 9.0})
  run = str(tmp_path)
  workdir_lib.write_json(run, workdir_lib.RESULTS_FILE, {'step': 6})
  workdir_lib.write_json(run, evaluate.OLDER_EVALUATION_JSON, {'step': 6, 'top1_error': 1.0})
  assert evaluate.final_evaluation(run)['top1_error'] == 1.0  # reproduce's file before 2026-12-06
  workdir_lib.write_json(run, workdir_lib.RESULTS_FILE, {'step': 9})  # trained on since
  monkeypatch.setattr(evaluate, 'evaluate_workdir', lambda d: {'step': 9, 'top1_error': 2.0})
  assert evaluate.final_evaluation(run)['top1_error'] == 2.0
  assert workdir_lib.read_json(run, evaluate.EVALUATION_JSON) == {'step': 9, 'top1_error': 2.0}
  monkeypatch.setattr(evaluate, 'evaluate_workdir', lambda d: pytest.fail('scored again'))
  assert evaluate.final_evaluation(run)['top1_error'] == 2.0
