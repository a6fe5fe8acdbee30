"""A grid of runs as populations (training/grid.py): adding members, resuming with a later
resumable value, and what it refuses (a run trained alone in a member directory, a locked one)."""

import json
import os

import pytest
from conftest import tiny_default

from gaternet_jax.commands import sweep
from gaternet_jax.errors import UserError
from gaternet_jax.training import grid, population, procedure, workdir_lock
from gaternet_jax.training import workdir as workdir_lib


def _points(seeds, **overrides):
  config = tiny_default('plain', max_steps=2, **overrides)
  return sweep.grid_configs(config, [f'seed={",".join(map(str, seeds))}'])


def _train(points, root):
  return grid.train_grid(
    [c for _, _, c in points], [os.path.join(root, n) for n, _, _ in points], root
  )


def _record(configs, dirs, stage=None):
  return {
    'stage': stage,
    'stream': 0,
    'member_map': 'sequential',
    'members': [
      {'workdir': d, 'config': json.loads(c.to_json_best_effort())}
      for c, d in zip(configs, dirs, strict=True)
    ],
  }


def test_a_population_resumes_under_what_would_resume_each_run_alone():
  plain = [tiny_default('plain', seed=s) for s in (0, 1)]
  stored = _record(plain, ['a', 'b'])
  # A later λ (plain members ignore the gate sections), another cadence, another member map.
  later = [tiny_default('plain', seed=s, **{'gating.l1_weight': 0.3}) for s in (0, 1)]
  for c in later:
    c.eval_every_epochs = 7.0
  assert population._may_resume(stored, dict(_record(later, ['a', 'b']), member_map='vmap'))
  # Not another width, member order or stage; not a λ of gated members.
  wider = [tiny_default('plain', seed=s, **{'model.width': 2.0}) for s in (0, 1)]
  assert not population._may_resume(stored, _record(wider, ['a', 'b']))
  assert not population._may_resume(stored, _record(plain, ['b', 'a']))
  assert not population._may_resume(stored, _record(plain, ['a', 'b'], stage='stage3_joint'))
  gated = [tiny_default('gated', seed=s) for s in (0, 1)]
  gated_later = [tiny_default('gated', seed=s, **{'gating.l1_weight': 0.3}) for s in (0, 1)]
  assert not population._may_resume(_record(gated, ['a', 'b']), _record(gated_later, ['a', 'b']))


@pytest.mark.slow
def test_a_seed_added_after_a_finished_population_trains_in_the_next_one(tmp_path):
  root = str(tmp_path)
  first = _train(_points([0, 1]), root)
  more = _train(_points([0, 1, 2]), root)
  assert more[:2] == first  # the finished members are not trained again
  pop = os.path.join(root, population.POPULATION_DIR)
  assert sorted(os.listdir(pop)) == ['run', 'run.2']
  stored = json.load(open(os.path.join(pop, 'run.2', population.POPULATION_FILE)))
  assert [m['workdir'] for m in stored['members']] == [os.path.join(root, 'seed=2')]
  # Seed 2 trained as it trains alone.
  ((_, _, config),) = _points([2])
  alone = procedure.train_and_evaluate(config, str(tmp_path / 'alone'))
  assert more[2]['eval'] == alone['eval']


@pytest.mark.slow
def test_a_member_directory_with_a_run_trained_alone_is_refused(tmp_path):
  points = _points([0, 1])
  root = str(tmp_path)
  name, _, config = points[1]
  procedure.train_and_evaluate(config, os.path.join(root, name))
  os.remove(os.path.join(root, name, workdir_lib.RESULTS_FILE))  # as if stopped before its end
  with pytest.raises(UserError, match=r'holds a checkpoint \(step 2\) of a run trained alone') as e:
    _train(points, root)
  assert '\n' not in str(e.value)
  assert not os.path.exists(os.path.join(root, population.POPULATION_DIR, 'run'))


def test_a_member_directory_in_use_is_refused(tmp_path):
  points = _points([0, 1])
  root = str(tmp_path)
  with workdir_lock.WorkdirLock(os.path.join(root, points[1][0])):
    with pytest.raises(UserError, match='in use') as e:
      _train(points, root)
  assert '\n' not in str(e.value)
  assert not os.path.exists(os.path.join(root, population.POPULATION_DIR))


def test_a_directory_shared_by_two_members_is_refused(tmp_path):
  points = _points([0, 0])
  with pytest.raises(UserError, match='is the directory of two members') as e:
    _train(points, str(tmp_path))
  assert '\n' not in str(e.value)
