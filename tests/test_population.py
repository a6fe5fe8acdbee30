"""A grid trained as one population (`gaternet sweep --vectorize`, training/population.py)."""

import json
import os
import textwrap

import jax
import numpy as np
import pytest
from conftest import TINY_FLAGS, run_on_cpu_devices, tiny_default

from gaternet_jax import data as data_lib
from gaternet_jax.commands import sweep
from gaternet_jax.data import feed
from gaternet_jax.errors import UserError
from gaternet_jax.training import grid as grid_lib
from gaternet_jax.training import members, population, procedure, restore, steps
from gaternet_jax.training import workdir as workdir_lib

GRID = ['seed=0,1', 'gating.l1_weight=0.1,0.5']
POINTS = [f'seed={s},gating.l1_weight={w}' for s in (0, 1) for w in (0.1, 0.5)]


def _leaves_equal(a, b) -> bool:
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _max_difference(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


@pytest.fixture(scope='module')
def vectorized(tmp_path_factory):
  """The gated procedure for 2 seeds x 2 lambdas, vectorised; and the four points trained alone."""
  root = tmp_path_factory.mktemp('population')
  config = tiny_default('gated')
  results = list(
    sweep.sweep(sweep.grid_configs(config, GRID), str(root / 'grid'), None, vectorize=True)
  )
  alone = {}
  for name, _, point_config in sweep.grid_configs(config, GRID):
    alone[name] = procedure.train_and_evaluate(point_config, str(root / 'alone' / name))
  return root, results, alone


@pytest.mark.slow
def test_a_vectorized_grid_trains_the_runs_each_point_trains_alone(vectorized):
  root, results, alone = vectorized
  assert [r['point'] for r in results] == [
    {'seed': s, 'gating.l1_weight': w} for s in ('0', '1') for w in ('0.1', '0.5')
  ]
  for result, name in zip(results, POINTS, strict=True):
    assert result['eval'] == alone[name]['eval'], name
    assert result['step'] == alone[name]['step']
    for stage in workdir_lib.STAGES:
      together = restore.load_state(str(root / 'grid' / name / stage)).state
      apart = restore.load_state(str(root / 'alone' / name / stage)).state
      # On the CPU each member runs its own program (member_map 'sequential'): bit-identical.
      assert _leaves_equal(together.params, apart.params), (name, stage)
      assert _leaves_equal(together.batch_stats, apart.batch_stats), (name, stage)
      assert _leaves_equal(together.opt_state, apart.opt_state), (name, stage)
  # The points differ from each other (seeds and lambdas reached their members).
  evals = {json.dumps(r['eval'], sort_keys=True) for r in results}
  assert len(evals) == 4


@pytest.mark.slow
def test_each_member_is_an_ordinary_finished_run(vectorized):
  root, results, _ = vectorized
  name = POINTS[3]
  member_dir = str(root / 'grid' / name)
  config = workdir_lib.load_config(member_dir)
  assert config.seed == 1 and config.gating.l1_weight == 0.5
  # Rerunning it alone, as `gaternet train` would, trains nothing and changes nothing.
  before = json.load(open(os.path.join(member_dir, 'results.json')))
  assert procedure.train_and_evaluate(config, member_dir) == before
  assert before['stages'][workdir_lib.STAGE_JOINT].endswith(workdir_lib.STAGE_JOINT)
  # Loadable for analysis like any run.
  run = restore.load_run(member_dir)
  images = np.zeros((2, *run.image_shape), np.uint8)
  logits, gates = run.predict(images)
  assert logits.shape[0] == 2 and gates.shape == (2, run.num_gates)
  # The stacked checkpoints stay in the population's own directory.
  stored = json.load(
    open(root / 'grid' / population.POPULATION_DIR / workdir_lib.STAGE_JOINT / 'population.json')
  )
  assert [m['workdir'] for m in stored['members']] == [
    str(root / 'grid' / p / workdir_lib.STAGE_JOINT) for p in POINTS
  ]
  # Members that differ only in lambda share their plain pre-training: trained once per seed.
  for stage in (workdir_lib.STAGE_BACKBONE, workdir_lib.STAGE_GATER):
    pop = root / 'grid' / population.POPULATION_DIR / stage / 'population.json'
    assert len(json.load(open(pop))['members']) == 2, stage
  # A rerun of the whole sweep trains nothing and returns the same results.
  again = list(
    sweep.sweep(
      sweep.grid_configs(tiny_default('gated'), GRID), str(root / 'grid'), None, vectorize=True
    )
  )
  assert [r['eval'] for r in again] == [r['eval'] for r in results]


@pytest.mark.slow
def test_a_killed_population_resumes_to_the_same_result(tmp_path, monkeypatch):
  config = tiny_default('plain')
  grid = ['seed=0,1']
  call = members.PopulationDispatch.__call__

  def crash_after_step_4(self, state, step, n):
    if step >= 4:
      raise KeyboardInterrupt('killed')
    return call(self, state, step, n)

  monkeypatch.setattr(members.PopulationDispatch, '__call__', crash_after_step_4)
  with pytest.raises(KeyboardInterrupt):
    list(
      sweep.sweep(sweep.grid_configs(config, grid), str(tmp_path / 'grid'), None, vectorize=True)
    )
  pop_dir = str(tmp_path / 'grid' / population.POPULATION_DIR / 'run')
  assert restore.checkpoints.latest_step(pop_dir) == 3  # the last checkpoint before the kill
  monkeypatch.setattr(members.PopulationDispatch, '__call__', call)
  resumed = list(
    sweep.sweep(sweep.grid_configs(config, grid), str(tmp_path / 'grid'), None, vectorize=True)
  )
  for result, (name, _, point_config) in zip(
    resumed, sweep.grid_configs(config, grid), strict=True
  ):
    alone = procedure.train_and_evaluate(point_config, str(tmp_path / 'alone' / name))
    assert result['eval'] == alone['eval']
    together = restore.load_state(str(tmp_path / 'grid' / name)).state
    apart = restore.load_state(str(tmp_path / 'alone' / name)).state
    assert _leaves_equal(together.params, apart.params)


@pytest.mark.slow
def test_vmapped_members_match_runs_alone_within_float_tolerance(tmp_path):
  """One batched program (XLA's convolutions on the CPU) against each member's own program."""
  config = tiny_default('plain', max_steps=2)
  grid = ['seed=0,1', 'optimizer.learning_rate=0.05,0.1']
  points = sweep.grid_configs(config, grid)
  together = grid_lib.train_grid(
    [c for _, _, c in points],
    [str(tmp_path / 'vmap' / name) for name, _, _ in points],
    str(tmp_path / 'vmap'),
    member_map='vmap',
  )
  for result, (name, _, point_config) in zip(together, points, strict=True):
    alone = procedure.train_and_evaluate(point_config, str(tmp_path / 'alone' / name))
    a = restore.load_state(str(tmp_path / 'vmap' / name)).state.params
    b = restore.load_state(str(tmp_path / 'alone' / name)).state.params
    assert _max_difference(a, b) < 1e-3, name
    assert abs(result['eval']['loss'] - alone['eval']['loss']) < 1e-3
    assert result['population']['members'] == 4


def test_member_orders_are_each_members_own():
  config = tiny_default('plain')
  dataset = data_lib.load_dataset(config.data)
  setup = steps.build(config, dataset.info)
  images, labels = dataset.train_arrays()
  keys = [jax.random.key(s) for s in (3, 7)]
  common = dict(num_train=dataset.info.num_train, batch_size=100, sharding=setup.data_sharding)
  together = feed.MemberOrders(
    images, labels, keys=members.stack(keys, setup.replicated), **common
  ).orders(1, 2)
  for k, key in enumerate(keys):
    alone = feed.ResidentTrainData(images, labels, key=key, **common).orders(1, 2)
    assert np.array_equal(np.asarray(together[k]), np.asarray(alone))


def test_only_values_that_differ_become_traced():
  config = tiny_default('gated')
  dataset = data_lib.load_dataset(config.data)
  setups = [
    steps.build(tiny_default('gated', seed=s, **{'gating.l1_weight': w}), dataset.info)
    for s, w in ((0, 0.1), (1, 0.1), (0, 0.5))
  ]
  hyper = members.member_hyper(setups)
  assert list(hyper) == ['gating.l1_weight']
  np.testing.assert_array_equal(hyper['gating.l1_weight'], np.float32([0.1, 0.1, 0.5]))


@pytest.mark.parametrize(
  'grid, field',
  [
    (['model.width=1,2'], 'model.width'),
    (['batch_size=50,100'], 'batch_size'),
    (['seed=0,1', 'schedule.num_epochs=2,3'], 'schedule.num_epochs'),
  ],
)
def test_a_grid_that_changes_the_program_is_refused_with_one_line(tmp_path, grid, field):
  config = tiny_default('gated')
  with pytest.raises(UserError, match=f'--vectorize: the grid varies {field}') as e:
    list(sweep.sweep(sweep.grid_configs(config, grid), str(tmp_path), None, vectorize=True))
  assert '\n' not in str(e.value)
  assert not any(tmp_path.iterdir())


def test_each_member_may_start_from_its_own_runs_but_not_only_some():
  def config(seed, backbone):
    return tiny_default('gated', seed=seed, **{'init.backbone': backbone})

  population.check_vectorizable([config(0, '/runs/plain0'), config(1, '/runs/plain1')])
  with pytest.raises(UserError, match='init.backbone is set for some points only') as e:
    population.check_vectorizable([config(0, '/runs/plain0'), config(1, None)])
  assert '\n' not in str(e.value)


def test_mixing_zero_and_positive_gate_dropout_is_refused():
  configs = [tiny_default('gated', **{'gater.dropout_rate': r}) for r in (0.0, 0.05)]
  with pytest.raises(UserError, match='gater.dropout_rate mixes 0'):
    population.check_vectorizable(configs)
  population.check_vectorizable(
    [tiny_default('gated', **{'gater.dropout_rate': r}) for r in (0.02, 0.05)]
  )


@pytest.mark.slow
def test_the_command_line_refuses_a_bad_grid_and_trains_a_good_one(tmp_path, cli):
  base = ['sweep', '--config', 'experiments/default.py:plain', '--workdir', str(tmp_path)]
  bad = cli(*base, *TINY_FLAGS, '--sweep', 'model.width=1,2', '--vectorize')
  assert bad.returncode == 2
  lines = [l for l in bad.stderr.strip().splitlines() if l.startswith('gaternet: error:')]
  assert len(lines) == 1 and 'model.width' in lines[0], bad.stderr[-2000:]
  assert not any(tmp_path.iterdir())
  alone = cli(*base, *TINY_FLAGS, '--sweep', 'seed=0,1', '--member_map', 'vmap')
  assert alone.returncode == 2 and 'add --vectorize' in alone.stderr.strip().splitlines()[-1]
  assert not any(tmp_path.iterdir())
  good = cli(*base, *TINY_FLAGS, '--sweep', 'seed=0,1', '--vectorize')
  assert good.returncode == 0, good.stderr[-2000:]
  printed = [json.loads(l) for l in good.stdout.strip().splitlines()]
  assert [p['point'] for p in printed] == [{'seed': '0'}, {'seed': '1'}]
  assert all(os.path.exists(tmp_path / f'seed={s}' / 'results.json') for s in (0, 1))


TWO_DEVICES = textwrap.dedent("""
    import json, sys, tempfile, os
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    from conftest import tiny_default
    from gaternet_jax.commands import sweep
    from gaternet_jax.training import grid as grid_lib, procedure, restore
    assert jax.device_count() == 2, jax.devices()
    root = tempfile.mkdtemp()
    config = tiny_default('plain', max_steps=2)
    grid = ['seed=0,1', 'optimizer.learning_rate=0.05,0.1']
    points = sweep.grid_configs(config, grid)
    out = {}
    for member_map in ('sequential', 'vmap'):
      where = os.path.join(root, member_map)
      grid_lib.train_grid([c for _, _, c in points], [os.path.join(where, n) for n, _, _ in points],
                            where, member_map=member_map)
    for name, _, c in points:
      procedure.train_and_evaluate(c, os.path.join(root, 'alone', name))
      alone = restore.load_state(os.path.join(root, 'alone', name)).state.params
      for member_map in ('sequential', 'vmap'):
        together = restore.load_state(os.path.join(root, member_map, name)).state.params
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)))
        out[f'{member_map}/{name}'] = diff
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_members_are_replicated_over_the_data_axis_of_several_devices():
  """On 2 devices each member's batch is split over both, as a run alone's."""
  diffs = run_on_cpu_devices(TWO_DEVICES, 2)
  assert len(diffs) == 8
  for key, diff in diffs.items():
    assert diff == 0.0 if key.startswith('sequential/') else diff < 1e-3, (key, diff)


@pytest.mark.slow
def test_a_population_directory_resumes_only_its_own_members(tmp_path):
  config = tiny_default('plain', max_steps=1)
  seeds = lambda *s: [tiny_default('plain', max_steps=1, seed=k) for k in s]  # noqa: E731
  dirs = [str(tmp_path / 'a'), str(tmp_path / 'b')]
  pop_dir = str(tmp_path / 'population')
  first = population.train_population(seeds(0, 1), dirs, pop_dir)
  with pytest.raises(UserError, match='holds another population'):
    population.train_population(seeds(0, 2), [str(tmp_path / 'c'), str(tmp_path / 'd')], pop_dir)
  # Another member map is the same population: it resumes (here: finished, nothing to train).
  again = population.train_population(seeds(0, 1), dirs, pop_dir, member_map='map')
  assert [r['eval'] for r in again] == [r['eval'] for r in first]
  assert config.max_steps == first[0]['step'] == 1


@pytest.mark.slow
def test_a_kill_while_members_are_written_out_resumes(tmp_path, monkeypatch):
  grid = sweep.grid_configs(tiny_default('plain', max_steps=1), ['seed=0,1,2'])
  configs, dirs = [c for _, _, c in grid], [str(tmp_path / n) for n, _, _ in grid]
  write = members.write_member
  written = []

  def killed_after_the_first(*args, **kwargs):
    if written:
      raise KeyboardInterrupt('killed')
    written.append(write(*args, **kwargs))

  monkeypatch.setattr(members, 'write_member', killed_after_the_first)
  with pytest.raises(KeyboardInterrupt):
    grid_lib.train_grid(configs, dirs, str(tmp_path))
  assert workdir_lib.is_finished(dirs[0]) and not workdir_lib.is_finished(dirs[1])
  monkeypatch.setattr(members, 'write_member', write)
  results = grid_lib.train_grid(configs, dirs, str(tmp_path))
  assert all(workdir_lib.is_finished(d) for d in dirs)
  assert [r['population']['member'] for r in results] == [0, 1, 2]
