"""The `gaternet` subcommands: flags, one library call per command, printing. Nothing else.

`main.py` prepares the environment and dispatches here; every UserError becomes one line on stderr,
a signal that stopped training one line and its exit status (143, 130).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import jax
from absl import app, flags
from ml_collections import config_flags

from gaternet_jax import environment, legacy, usage
from gaternet_jax.analysis import collect

# Imported after `environment.prepare()` (main.py): these start JAX.
from gaternet_jax.commands import describe, evaluate, export, report, reproduce, sweep, tradeoff
from gaternet_jax.errors import Interrupted, StopSignal, UserError
from gaternet_jax.training import distributed, preemption, procedure
from gaternet_jax.training import workdir as workdir_lib

FLAGS = flags.FLAGS

USAGE = usage.USAGE
CONFIG_HELP = (
  'Every field of the config can be set with --config.FIELD=VALUE; '
  'list them with: gaternet describe --config FILE[:variant] --show_config'
)


_ALL = usage.COMMANDS
# (commands, kind, name, default, help): every flag of every command, in --help order.
_FLAGS = (
  (('train', 'evaluate', 'analyze', 'export', 'tradeoff', 'sweep', 'reproduce'), 'string', 'workdir',
   None,
   'Run directory (checkpoints, events, results); gs:// works.'),
  (('train',), 'integer', 'resume_step', None,
   'Resume from this checkpoint, not the latest (later ones are set aside).'),
  (('evaluate', 'analyze', 'tradeoff'), 'string', 'split', None,
   "Split to use (default: the config's data.eval_split)."),
  (('export',), 'string', 'split', None,
   'Calibration split (default: train, without augmentation).'),
  (('evaluate',), 'integer', 'step', None, 'Checkpoint step to evaluate (default: the latest).'),
  (('evaluate',), 'float', 'gate_threshold', 0.0,
   "Evaluation gates are 1(g' > T); 0 is the trained model, higher switches filters off."),
  (('evaluate',), 'bool', 'skip_off_units', False,
   'Skip every unit whose gates are all off for the whole batch (same results; ResNets).'),
  (('tradeoff',), 'string', 'thresholds', None,
   'Gate thresholds T1,T2,... (default: -1,0,0.5,1,2,4).'),
  (('evaluate', 'describe', 'compile'), 'bool', 'json', False, 'Print one JSON object.'),
  (('compile',), 'string', 'topology', None,
   'TPU slice: v4-8 ... v4-4096, v5e-1 ... v5e-256, v5p-8 ..., v6e-1 ..., or raw, e.g. v4:2x2x4.'),
  (('describe',), 'bool', 'show_config', False,
   'Print the resolved config (every field --config.FIELD= can set).'),
  (('analyze', 'export'), 'integer', 'max_examples', None, 'Use at most this many examples.'),
  (('analyze',), 'integer', 'max_embed_examples', 2000, 'Examples in the t-SNE embedding.'),
  (('analyze', 'export', 'tradeoff', 'report'), 'string', 'out', None,
   'Output: a folder (default WORKDIR/analysis, WORKDIR/export, WORKDIR/tradeoff) / for report, '
   'a Markdown file.'),
  (('report',), 'multi_string', 'workdir', [], 'A finished run (repeat; or list them after it).'),
  (('sweep',), 'multi_string', 'sweep', [], 'FIELD=V1,V2,... (repeat for a grid).'),
  (('sweep',), 'bool', 'vectorize', False,
   'Train every point as one program (the grid may vary seed, learning rate, gate dropout and '
   'gate-loss weights only).'),
  (('reproduce',), 'bool', 'vectorize', False,
   'Train the seeds of each run kind (plain, gated, control) as one program.'),
  (('sweep', 'reproduce'), 'string', 'member_map', None,
   'With --vectorize: vmap, map or sequential (default: vmap on GPU/TPU, sequential on a CPU).'),
  (('reproduce',), 'string', 'seeds', '0,1,2', 'Seeds S1,S2,... (each: plain, gated, control).'),
  (('reproduce',), 'float', 'epochs', None,
   "Epochs per stage (default: the config's schedule.num_epochs)."),
  (('reproduce',), 'bool', 'summary_only', False,
   'Train nothing: the table over the seeds whose plain, gated and control runs are all finished.'),
  (_ALL, 'string', 'coordinator_address', None,
   'Manual multi-process launch: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).'),
  (_ALL, 'integer', 'num_processes', None, 'Manual launch: processes (or JAX_NUM_PROCESSES).'),
  (_ALL, 'integer', 'process_id', None, 'Manual launch: this process (or JAX_PROCESS_ID).'),
)  # fmt: skip


# Flags once spelled with hyphens: those spellings still work, as hidden aliases.
HYPHENATED_ALIASES = ('gate_threshold', 'skip_off_units', 'max_examples', 'max_embed_examples')


def _define(command: str) -> list[str]:
  """Defines the command's flags; returns their names in the order --help lists them."""
  names = []
  if command in ('train', 'describe', 'sweep', 'reproduce', 'compile'):
    text = 'Experiment config FILE[:variant].'
    config_flags.DEFINE_config_file('config', None, text, lock_config=True)
    names.append('config')
  for commands, kind, name, default, text in _FLAGS:
    if command in commands:
      getattr(flags, f'DEFINE_{kind}')(name, default, text)
      names.append(name)
      if name in HYPHENATED_ALIASES:  # the spelling of older READMEs and scripts, not listed
        flags.DEFINE_alias(name.replace('_', '-'), name)
  auto = 'jax.distributed.initialize(): auto = on a TPU pod, a SLURM step or a manual launch.'
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'true', 'false'], auto)
  return names + ['distributed']


def _help(command: str, names: list[str]) -> str:
  lines = [f'usage: {USAGE[command]}', '', 'flags:']
  lines += [f'  --{name:<22} {FLAGS[name].help}' for name in names]
  if 'config' in names:
    lines += ['', CONFIG_HELP]
  return '\n'.join(lines)


def run(command: str, argv: list[str], fail: Callable[[str], None]) -> None:
  names = _define(command)
  if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
    print(_help(command, names))
    if '--helpfull' in argv[1:]:  # and every flag absl knows, its own included
      print('\nall flags:\n' + FLAGS.get_help())
    return

  def parse(args):
    try:
      return FLAGS(args)
    except (AttributeError, KeyError) as e:  # lock_config: an override names no existing field
      missing = str(e.__context__ or e).strip('"\'')
      culprit = [a for a in args if a.startswith('--config.') and f'.{missing}' in a.split('=')[0]]
      field = culprit[0].split('=')[0].removeprefix('--config.') if culprit else ''
      fail(
        f'unknown config field {missing!r}'
        + (f' in {culprit[0]}{legacy.renamed_hint(field)}' if culprit else '')
      )
    except Exception as e:  # noqa: BLE001 - absl/config_flags raise several types
      fail(_first_line(e.__cause__ if isinstance(e.__cause__, UserError) else e))

  def body(args):
    try:
      distributed.initialize(
        FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
      )
      environment.enable_compilation_cache()
      with preemption.CommandSignals():
        COMMANDS[command](args)
    except (Interrupted, StopSignal) as e:
      print(f'gaternet: {e}', file=sys.stderr)
      raise SystemExit(e.exit_code) from None
    except UserError as e:
      fail(_first_line(e))
    except OSError as e:  # config_flags reports an unloadable config file lazily, as IOError
      fail(_config_error(e) if 'config' in FLAGS and 'config file' in str(e) else _first_line(e))

  environment.quiet_libraries()
  app.run(body, argv=argv, flags_parser=parse)


def _config_error(error: OSError) -> str:
  path = config_flags.get_config_filename(FLAGS['config'])
  if not os.path.exists(path) and path.rsplit(':', 1)[0].endswith('.py'):
    path = path.rsplit(':', 1)[0]  # the file, without its :variant
  if not os.path.exists(path):
    return f'config file {path!r} not found'
  reasons = [l.strip() for l in str(error).splitlines() if l.strip().startswith('[Errno')]
  return f'cannot load config file {path!r}' + (f': {reasons[0]}' if reasons else '')


def _first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return lines[0] if lines else type(error).__name__


def _value(name: str, what: str = ''):
  value = FLAGS[name].value
  if value is None:
    raise UserError(f'--{name} is required{what}')
  return value


def _member_map() -> str | None:
  """--member_map, which only a vectorized command reads: alone it would be silently ignored."""
  if FLAGS.member_map is not None and not FLAGS.vectorize:
    raise UserError('--member_map sets how a population shares the machine: add --vectorize')
  return FLAGS.member_map


def cmd_train(argv) -> None:
  config, workdir = _value('config'), _value('workdir')
  results = procedure.train_and_evaluate(config, workdir, resume_step=FLAGS.resume_step)
  if distributed.is_leader():
    print(json.dumps(results, sort_keys=True))


def cmd_evaluate(argv) -> None:
  result = evaluate.evaluate_workdir(
    _value('workdir'),
    split=FLAGS.split,
    step=FLAGS.step,
    gate_threshold=FLAGS.gate_threshold,
    skip_off_units=FLAGS.skip_off_units,
  )
  if distributed.is_leader():
    print(json.dumps(result, sort_keys=True) if FLAGS.json else evaluate.format_text(result))


def cmd_describe(argv) -> None:
  config = _value('config', ' (e.g. --config experiments/default.py)')
  if FLAGS.show_config:
    print(config)
    return
  stats = describe.summary(config)
  print(json.dumps(stats) if FLAGS.json else describe.format_text(config, stats))


def cmd_analyze(argv) -> None:
  workdir = _value('workdir')
  out = FLAGS.out or os.fspath(workdir_lib.path(workdir, workdir_lib.ANALYSIS_DIR))
  limits = {'max_examples': FLAGS.max_examples}
  limits['max_embed_examples'] = FLAGS.max_embed_examples
  result = collect.analyze_workdir(workdir, split=FLAGS.split, out_dir=out, **limits)
  if result:
    print(collect.format_text(result, out))


def cmd_export(argv) -> None:
  result = export.export_workdir(
    _value('workdir'), split=FLAGS.split, max_examples=FLAGS.max_examples, out=FLAGS.out
  )
  if distributed.is_leader():
    print(export.format_text(result))


def cmd_tradeoff(argv) -> None:
  thresholds = tradeoff.parse_thresholds(FLAGS.thresholds)
  result = tradeoff.tradeoff_workdir(
    _value('workdir'), split=FLAGS.split, thresholds=thresholds, out_dir=FLAGS.out
  )
  if distributed.is_leader():
    print(tradeoff.format_text(result))


def cmd_report(argv) -> None:
  workdirs = [*FLAGS.workdir, *argv[1:]]
  if not workdirs:
    raise UserError(f'usage: {USAGE["report"]}')
  table = report.make_table(workdirs)
  print(table)
  if FLAGS.out:
    report.write_table(FLAGS.out, table)


def cmd_sweep(argv) -> None:
  config, workdir = _value('config'), _value('workdir')
  points = sweep.grid_configs(config, FLAGS.sweep)
  results = sweep.sweep(
    points,
    workdir,
    procedure.train_and_evaluate,
    vectorize=FLAGS.vectorize,
    member_map=_member_map(),
  )
  for result in results:
    if distributed.is_leader():
      print(json.dumps(result, sort_keys=True), flush=True)
  summary = sweep.summarize(points, workdir)
  if distributed.is_leader():
    sweep.write_summary(summary, workdir)
    print(sweep.markdown(summary), end='', file=sys.stderr)


def cmd_reproduce(argv) -> None:
  config, workdir = _value('config'), _value('workdir')
  seeds = reproduce.parse_seeds(FLAGS.seeds)
  say = lambda message: print(f'gaternet reproduce: {message}', file=sys.stderr, flush=True)
  summary = reproduce.reproduce(
    config,
    workdir,
    seeds,
    FLAGS.epochs,
    progress=say,
    vectorize=FLAGS.vectorize,
    member_map=_member_map(),
    summary_only=FLAGS.summary_only,
  )
  if distributed.is_leader():
    print(reproduce.markdown(summary), end='')


def cmd_compile(argv) -> None:
  from gaternet_jax.commands import aot  # noqa: PLC0415 - the TPU topology API, only here

  config = _value('config')
  # TPU executables cannot be read back without a TPU client: compile afresh, store nothing.
  jax.config.update('jax_enable_compilation_cache', False)
  topology = _value('topology', ' (e.g. --topology v4-32)')
  with preemption.exit_at_once_on_signal(f'the compile for {topology}'):
    result = aot.compile_for(config, topology)
  print(json.dumps(result, sort_keys=True) if FLAGS.json else aot.format_text(result))
  aot.check_fits(result)


COMMANDS = {name: globals()[f'cmd_{name}'] for name in _ALL}
