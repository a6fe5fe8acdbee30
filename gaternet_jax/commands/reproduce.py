"""`gaternet reproduce`: a row of the paper's Table 1 over several seeds, with the control it lacks.

For every seed s, in `WORKDIR/seed<s>/`:

  plain/    the plain backbone (the baseline row);
  gated/    the paper's procedure (section 4.4): stage 1 is `plain/` of the same seed; stage 2, the
            gater's extractor pre-trained as a classifier, is another seed's `plain/` when the
            extractor has the backbone's architecture (a separately pre-trained classifier, as
            the paper asks, at no extra cost), else trained in the procedure; then the joint stage;
  control/  the plain backbone trained on from `plain/` for the joint stage's epochs with a
            restarted schedule: the gated model's total training (stage 1 + stage 3) without the
            gater, the control that says whether a gain comes from the gates or from the extra
            schedule.

Runs train seed by seed, each right after the plain runs it starts from (seeds 0, 1, 2: plain 0,
plain 1, gated 0, control 0, plain 2, gated 1, ...), so every seed's comparison is complete as early
as it can be: a reproduction of many CPU hours has rows to read after its first seed, and one whose
files are lost midway loses the fewest finished comparisons. Each is an ordinary run (evaluate,
analyze, export and load_run work on it); finished ones are skipped, interrupted ones resume, and
every run's config is checked against what its directory holds before any trains.
With `vectorize`, the seeds of each kind train as one population (training/population.py: one
program, each member what it trains alone), checkpointed in `WORKDIR/population/`; an interrupted
population resumes with `--vectorize` again.
At the end every run is scored on the config's evaluation split and `reproduce.json`,
`reproduce.md` and `reproduce.png` summarise them: per seed and mean +- std, the top-1 error, the
gate density, the MACs used and the training wall time; gated - plain and gated - control.
`summary_only` (`--summary_only`) trains nothing and writes the same files over the seeds whose
three runs are finished, naming the others: a reproduction of many hours read while it runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import jax
import ml_collections

from gaternet_jax import validation
from gaternet_jax.commands import evaluate, summary_files, sweep
from gaternet_jax.errors import UserError
from gaternet_jax.training import (
  checkpoints,
  distributed,
  grid,
  population,
  preemption,
  procedure,
)
from gaternet_jax.training import workdir as workdir_lib

RUNS = ('plain', 'gated', 'control')
RESULTS_JSON = 'reproduce.json'
TABLE_MD = 'reproduce.md'
FIGURE_PNG = 'reproduce.png'
FILES = summary_files.Names(RESULTS_JSON, TABLE_MD, FIGURE_PNG)


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' -> [0, 1, 2]; distinct non-negative integers, at least one."""
  try:
    seeds = [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise UserError(f'--seeds must be integers separated by commas, got {text!r}') from None
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise UserError(f'--seeds must be distinct non-negative integers, got {text!r}')
  return seeds


def run_dir(workdir: str, seed: int, run: str) -> str:
  return workdir_lib.join(workdir, f'seed{seed}', run)


def plan(
  config: ml_collections.ConfigDict, workdir: str, seeds: list[int], epochs: float | None = None
) -> dict[str, list[tuple[int, ml_collections.ConfigDict]]]:
  """run kind -> [(seed, config)] of every run, checked before any trains."""
  if not config.model.gated or not config.procedure.pretrain:
    raise UserError(
      'reproduce needs a gated config trained by the procedure '
      '(e.g. experiments/cifar10_resnet20.py:gated, procedure.pretrain=True)'
    )
  if config.init.backbone or config.init.gater:
    raise UserError('reproduce sets init.backbone and init.gater itself; leave them unset')
  if epochs is not None and not epochs > 0:
    raise UserError(f'--epochs must be > 0, got {epochs}')
  config = config.copy_and_resolve_references()
  if epochs is not None:
    config.schedule.num_epochs = float(epochs)
  plain = procedure.backbone_stage_config(config)
  gater = procedure.gater_stage_config(config)
  # A plain run of another seed is stage 2 when it is the classifier stage 2 would train.
  share_gater = len(seeds) > 1 and all(
    gater.model[k] == plain.model[k] for k in ('backbone', 'width', 'se_reduction')
  )
  runs = {kind: [] for kind in RUNS}
  for i, seed in enumerate(seeds):
    plain_s = with_seed(plain, seed)
    gated_s = with_seed(config, seed)
    gated_s.init.backbone = run_dir(workdir, seed, 'plain')
    if share_gater:
      gated_s.init.gater = run_dir(workdir, seeds[(i + 1) % len(seeds)], 'plain')
    control_s = with_seed(plain, seed)
    control_s.init.backbone = run_dir(workdir, seed, 'plain')  # recorded in its config.json
    runs['plain'].append((seed, plain_s))
    runs['gated'].append((seed, gated_s))
    runs['control'].append((seed, control_s))
  return runs


def training_order(
  runs: dict[str, list[tuple[int, ml_collections.ConfigDict]]], workdir: str
) -> list[tuple[str, int]]:
  """(kind, seed) of every run of `plan`, seed by seed, each after the plain runs it starts from."""
  plain_seed = {run_dir(workdir, seed, 'plain'): seed for seed, _ in runs['plain']}
  order = []

  def add(kind: str, seed: int) -> None:
    if (kind, seed) not in order:
      order.append((kind, seed))

  for (seed, gated), (_, control) in zip(runs['gated'], runs['control']):
    for run, c in (('gated', gated), ('control', control)):
      for start in (c.init.backbone, c.init.gater):
        if start:
          add('plain', plain_seed[start])
      add(run, seed)
  return order


def _prepared(
  config: ml_collections.ConfigDict, directory: str
) -> tuple[ml_collections.ConfigDict, bool]:
  """The config the run in `directory` resumes with, and whether it is finished (every process
  agreeing); a finished run writes nothing again but a different config is still refused."""
  config = checkpoints.keep_stored_recipe(config, directory, procedure.STAGES)
  finished = distributed.agree(lambda: workdir_lib.is_finished(directory))
  if finished:
    checkpoints.check_resume_config(config, directory, procedure.STAGES)
  return config, finished


def with_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.seed = seed
  return config


def reproduce(
  config: ml_collections.ConfigDict,
  workdir: str,
  seeds: list[int],
  epochs: float | None = None,
  progress: Callable[[str], None] = lambda message: None,
  *,
  vectorize: bool = False,
  member_map: str | None = None,
  summary_only: bool = False,
) -> dict[str, Any]:
  """Trains (or resumes) every run of `plan`, then writes and returns the summary. With
  `summary_only` nothing trains: the summary covers the seeds whose plain, gated and control runs
  are all finished (a reproduction of many hours, read midway) and names the others."""
  runs = plan(config, workdir, seeds, epochs)
  # The data-dependent checks of the plain and the gated config, before anything trains.
  sweep.check_data([(f'reproduce {kind} run', runs[kind][0][1]) for kind in ('plain', 'gated')])
  train = {
    'plain': procedure.train_and_evaluate,
    'gated': procedure.train_and_evaluate,
    'control': lambda c, directory: procedure.train_control(c, directory, c.init.backbone),
  }
  if vectorize:
    # train_grid checks each population again; this fails before the plain runs train for hours.
    # The plain and control configs are the gated ones' backbone stage, varying where they vary.
    population.check_vectorizable([c for _, c in runs['gated']])
  # (kind, seed) -> (config, finished) of every run, each config checked against its directory
  # before anything trains; finished agreed by every process.
  prepared = {
    (kind, seed): _prepared(c, run_dir(workdir, seed, kind))
    for kind in RUNS
    for seed, c in runs[kind]
  }
  # The seeds the summary covers: with summary_only those whose three runs are finished, else every
  # seed (trained below).
  done = [s for s in seeds if all(prepared[k, s][1] for k in RUNS)] if summary_only else seeds
  if summary_only:
    if not done:
      raise UserError(
        f'no seed of {",".join(map(str, seeds))} has its plain, gated and control runs all '
        f'finished in {workdir} yet: nothing to summarise'
      )
  elif vectorize:
    for kind in RUNS:  # every plain run first: the gated runs start from them
      todo = [(seed, *prepared[kind, seed]) for seed, _ in runs[kind]]
      unfinished = [seed for seed, _, finished in todo if not finished]
      if not unfinished:
        continue
      preemption.check_stop()  # every seed: the population knows which members are finished
      progress(f'seeds {",".join(map(str, unfinished))}: {kind}, as one population')
      run_configs = [c for _, c, _ in todo]
      directories = [run_dir(workdir, seed, kind) for seed, _, _ in todo]
      train_together(kind, run_configs, directories, workdir, member_map)
  else:
    for kind, seed in training_order(runs, workdir):
      c, finished = prepared[kind, seed]
      if finished:
        continue
      preemption.check_stop()
      progress(f'seed {seed}: {kind}')
      train[kind](c, run_dir(workdir, seed, kind))
  rows = {kind: {seed: scored(run_dir(workdir, seed, kind)) for seed in done} for kind in RUNS}
  summary = summarize(rows, runs['gated'][0][1], done)
  summary['unfinished_seeds'] = [seed for seed in seeds if seed not in done]
  if distributed.is_leader():
    from gaternet_jax.analysis import figures  # noqa: PLC0415 - matplotlib only here

    summary_files.write(
      workdir, FILES, summary, markdown(summary), figures.reproduce_figure(summary)
    )
  return summary


def train_together(
  kind: str, run_configs: list, directories: list[str], workdir: str, member_map: str | None
) -> None:
  """The runs of one kind, every seed, as one population in `workdir/population/`: the plain and
  gated ones as `gaternet sweep --vectorize` trains a grid (each gated member from its own seed's
  plain run), the controls as `procedure.train_control` trains each."""
  if kind != 'control':
    grid.train_grid(run_configs, directories, workdir, member_map=member_map)
    return
  for c, directory in zip(run_configs, directories, strict=True):
    validation.validate_config(c)
    validation.validate_workdir(directory)
  # The stream, epochs and learning rate are the recipe's, one for all members (the population
  # checks the recipes agree); the initialisation is each member's own plain run.
  stages = [procedure.control_stage(c, c.init.backbone) for c in run_configs]
  initialize = [s.pop('initialize') for s in stages]
  workdir_lib.ensure_writable(workdir, jax.process_index())
  with procedure.locked(workdir), grid.locked_members(directories):
    grid.train_stage(
      run_configs,
      directories,
      workdir_lib.join(workdir, population.POPULATION_DIR, 'control'),
      member_map=member_map,
      **stages[0],
      initialize=initialize,
    )


def scored(directory: str) -> dict[str, Any]:
  """A finished run's final evaluation and its training wall time (`results.json`: every session
  of the run; a gated run's is its joint stage, since its stages 1 and 2 are plain runs)."""
  return {
    **evaluate.final_evaluation(directory),
    'wall_time_s': workdir_lib.read_results(directory)['wall_time_s'],
  }


def _mean_std(values: list[float]) -> dict[str, float]:
  return {
    'mean': statistics.mean(values),
    'std': statistics.stdev(values) if len(values) > 1 else 0.0,
  }


def summarize(rows: dict[str, dict[int, dict]], config, seeds: list[int]) -> dict[str, Any]:
  """Per seed and mean +- std of each run kind; the gated run's differences to the others."""
  out: dict[str, Any] = {
    'name': config.name,
    'split': rows['gated'][seeds[0]]['split'],
    'epochs_per_stage': config.schedule.num_epochs,
    'seeds': seeds,
    'runs': {},
  }
  for kind in RUNS:
    per_seed = {
      str(s): {
        'top1_error': rows[kind][s]['top1_error'],
        'macs': rows[kind][s]['macs'],
        'gate_density': rows[kind][s].get('gate_density', 1.0),
        'step': rows[kind][s]['step'],
        'wall_time_s': rows[kind][s]['wall_time_s'],
      }
      for s in seeds
    }
    out['runs'][kind] = {
      'per_seed': per_seed,
      **{
        metric: _mean_std([per_seed[str(s)][metric] for s in seeds])
        for metric in ('top1_error', 'macs', 'gate_density', 'wall_time_s')
      },
    }
  for other in ('plain', 'control'):
    differences = [rows['gated'][s]['top1_error'] - rows[other][s]['top1_error'] for s in seeds]
    out[f'gated_minus_{other}'] = paired_difference(differences)
  return out


def paired_difference(differences: list[float]) -> dict[str, Any]:
  """Per-seed differences (gated - other, same seed), their mean +- std and, from two seeds on,
  the 95% confidence interval of the mean (Student's t, n - 1 degrees of freedom) with its
  verdict: 'lower' or 'higher' (gated's error) when the interval excludes 0, else 'unresolved'."""
  out: dict[str, Any] = {'per_seed': differences, **_mean_std(differences)}
  n = len(differences)
  if n > 1:
    # scipy.stats takes about a second to import: only here, not on every `gaternet` command.
    import scipy.stats  # noqa: PLC0415

    half = float(scipy.stats.t.ppf(0.975, n - 1)) * out['std'] / math.sqrt(n)
    low, high = out['mean'] - half, out['mean'] + half
    out['ci95'] = [low, high]
    out['verdict'] = 'lower' if high < 0 else 'higher' if low > 0 else 'unresolved'
  return out


def markdown(summary: dict[str, Any]) -> str:
  """The summary as a Markdown table (errors in %, MACs in millions per image)."""
  seeds = summary['seeds']
  head = [
    'run', *[f'seed {s}' for s in seeds], 'mean ± std', 'gate density', 'MMACs used',
    'wall (s, mean)',
  ]  # fmt: skip
  title = (
    f'{summary["name"]}, {summary["epochs_per_stage"]:g} epochs per stage, '
    f'top-1 error (%) on {summary["split"]}'
  )
  lines = [
    title,
    '',
    '| ' + ' | '.join(head) + ' |',
    '|' + '---|' * len(head),
  ]
  for kind in RUNS:
    r = summary['runs'][kind]
    cells = [f'{r["per_seed"][str(s)]["top1_error"]:.2f}' for s in seeds]
    lines.append(
      f'| {kind} | ' + ' | '.join(cells) + f' | {r["top1_error"]["mean"]:.2f} ± '
      f'{r["top1_error"]["std"]:.2f} | {r["gate_density"]["mean"]:.3f} | '
      f'{r["macs"]["mean"] / 1e6:.2f} | {r["wall_time_s"]["mean"]:,.0f} |'
    )
  for other in ('plain', 'control'):
    d = summary[f'gated_minus_{other}']
    cells = [f'{v:+.2f}' for v in d['per_seed']]
    mean = f'{d["mean"]:+.2f} ± {d["std"]:.2f}'
    lines.append(f'| gated − {other} | ' + ' | '.join(cells) + f' | {mean} | | | |')
  lines.append('')
  if unfinished := summary.get('unfinished_seeds'):
    seeds_word = 'seed' if len(unfinished) == 1 else 'seeds'
    lines.append(
      f'Not finished yet, left out of this table: {seeds_word} {", ".join(map(str, unfinished))}.'
    )
  for other in ('plain', 'control'):
    d = summary[f'gated_minus_{other}']
    if 'ci95' in d:
      low, high = d['ci95']
      words = {
        'lower': f'the gated error is lower than {other}',
        'higher': f'the gated error is higher than {other}',
        'unresolved': f'no difference from {other} resolved at {len(seeds)} seeds',
      }[d['verdict']]
      lines.append(
        f'gated − {other}: 95% confidence interval of the mean [{low:+.2f}, {high:+.2f}] '
        f"(paired over seeds, Student's t): {words}."
      )
  return '\n'.join(lines) + '\n'
