"""Implementation of the `gaternet` subcommands (absl flags + ml_collections config files).

`main.py` sets up the environment and dispatches here; every UserError becomes one line on stderr.
"""

from __future__ import annotations

import itertools
import logging as std_logging
import json
import os
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from gaternet_jax.errors import UserError

FLAGS = flags.FLAGS


def _define_common():
  flags.DEFINE_enum(
    'distributed',
    'auto',
    ['auto', 'true', 'false'],
    'Call jax.distributed.initialize(): auto = when a multi-process environment '
    '(a TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS) is detected.',
  )


def _define(command: str) -> None:
  _define_common()
  if command in ('train', 'describe', 'sweep'):
    config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file, optionally with :variant.', lock_config=True
    )
  if command in ('train', 'evaluate', 'analyze', 'sweep'):
    flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, events, results).')
  if command in ('evaluate', 'analyze'):
    flags.DEFINE_string('split', None, "Split to evaluate (default: the config's eval_split).")
  if command in ('evaluate', 'describe'):
    flags.DEFINE_bool('json', False, 'Print one JSON object.')
  if command == 'analyze':
    flags.DEFINE_integer('max-examples', None, 'Analyse at most this many examples of the split.')
    flags.DEFINE_integer('max-embed-examples', 2000, 'Examples in the t-SNE embedding.')
    flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/analysis).')
  if command == 'report':
    flags.DEFINE_string('out', None, 'Also write the Markdown table to this file.')
  if command == 'sweep':
    flags.DEFINE_multi_string('sweep', [], 'field=v1,v2,... (repeat for a grid).')


def run(command: str, argv: list[str], fail: Callable[[str], None]) -> None:
  _define(command)

  def parse(args):
    try:
      return FLAGS(args)
    except (AttributeError, KeyError) as e:  # lock_config: an override names no existing field
      missing = str(e.__context__ or e).strip('"\'')
      culprit = [a for a in args if a.startswith('--config.') and f'.{missing}' in a.split('=')[0]]
      fail(f'unknown config field {missing!r}' + (f' in {culprit[0]}' if culprit else ''))
    except Exception as e:  # noqa: BLE001 - absl/config_flags raise several types
      cause = e.__cause__ if isinstance(e.__cause__, UserError) else e
      fail(_first_line(cause))

  def body(args):
    try:
      _maybe_initialize_distributed()
      _enable_compilation_cache()
      COMMAND_FUNCTIONS[command](args)
    except UserError as e:
      fail(_first_line(e))
    except OSError as e:  # config_flags reports an unloadable config file lazily, as IOError
      fail(
        _config_load_error(e) if 'config' in FLAGS and 'config file' in str(e) else _first_line(e)
      )

  # JAX logs at INFO that it found no TPU; that is noise for CPU and GPU users.
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(body, argv=argv, flags_parser=parse)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax (several lines per checkpoint); keeps its warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _config_load_error(error: OSError) -> str:
  path = config_flags.get_config_filename(FLAGS['config'])
  if not os.path.exists(path):
    return f'config file {path!r} not found'
  reasons = [l.strip() for l in str(error).splitlines() if l.strip().startswith('[Errno')]
  return f'cannot load config file {path!r}' + (f': {reasons[0]}' if reasons else '')


def _first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return lines[0] if lines else type(error).__name__


def _maybe_initialize_distributed() -> None:
  import jax  # noqa: PLC0415

  mode = FLAGS.distributed
  if mode == 'false':
    return
  env = os.environ
  detected = (
    'JAX_COORDINATOR_ADDRESS' in env
    # Inside an `srun` step only: an `salloc` shell has SLURM_NTASKS but no peers running.
    or ('SLURM_STEP_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1)
    or len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
  )
  if mode == 'true' or detected:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      raise UserError(f'jax.distributed.initialize() failed: {_first_line(e)}') from None


def _enable_compilation_cache() -> None:
  import jax  # noqa: PLC0415

  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update(
      'jax_compilation_cache_dir',
      os.path.join(os.path.expanduser('~'), '.cache', 'gaternet_jax', 'xla'),
    )


def _require(name: str):
  value = FLAGS[name].value
  if value is None:
    raise UserError(f'--{name} is required')
  return value


def _config():
  config = FLAGS.config
  if config is None:
    raise UserError('--config is required (e.g. --config experiments/default.py)')
  return config


def cmd_train(argv) -> None:
  del argv
  import jax  # noqa: PLC0415
  from gaternet_jax import train  # noqa: PLC0415

  config, workdir = _config(), _require('workdir')
  logging.info('JAX devices: %s', jax.devices())
  results = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True))


def cmd_evaluate(argv) -> None:
  del argv
  import jax  # noqa: PLC0415
  from gaternet_jax import describe, procedure, train  # noqa: PLC0415

  workdir = _require('workdir')
  procedure.require_checkpoint(workdir)
  config, setup, state, dataset = procedure.load_state(workdir)
  split = FLAGS.split or config.data.eval_split
  dataset.info.split_size(split)  # a clear error for an unknown split
  _, eval_fn, _ = train.compile_steps(setup)
  metrics = train.evaluate(state, dataset, split, setup, eval_fn)
  stats = describe.describe(
    config, num_classes=dataset.info.num_classes, image_shape=dataset.info.image_shape
  )
  result = {
    'workdir': workdir,
    'name': config.name,
    'variant': config.variant,
    'split': split,
    'step': int(jax.device_get(state.step)),
    **metrics,
    'params': stats['total_params'],
    'gated_filters': stats['gated_filters'],
  }
  if jax.process_index() != 0:
    return
  if FLAGS.json:
    print(json.dumps(result, sort_keys=True))
    return
  print(
    f'{config.name} ({config.variant}) step {result["step"]}, {split}: '
    f'{metrics["examples"]} examples'
  )
  print(f'  top-1 error   {metrics["top1_error"]:.2f}%')
  print(f'  top-5 error   {metrics["top5_error"]:.2f}%')
  print(f'  loss          {metrics["loss"]:.4f}')
  print(f'  parameters    {stats["total_params"]:,} ({stats["total_params"] / 1e6:.2f}M)')
  print(f'  gated filters {stats["gated_filters"]:,}')
  if 'gate_density' in metrics:
    print(f'  gate density  {metrics["gate_density"]:.4f} (mean fraction of gates on)')


def cmd_describe(argv) -> None:
  del argv
  from gaternet_jax import describe  # noqa: PLC0415

  config = _config()
  num_classes, image_shape = describe.dataset_spec(config.data)
  stats = describe.describe(config, num_classes=num_classes, image_shape=image_shape)
  keys = (
    'backbone_params',
    'gater_params',
    'total_params',
    'gated_filters',
    'backbone_macs',
    'gater_macs',
  )
  if FLAGS.json:
    print(json.dumps({k: stats[k] for k in keys}))
    return
  print(
    f'{config.name} ({config.variant}): backbone {config.model.backbone}, '
    f'{num_classes} classes, input {"x".join(map(str, image_shape))}'
  )
  print(f'  backbone parameters {stats["backbone_params"]:>14,}')
  print(f'  gater parameters    {stats["gater_params"]:>14,}')
  print(f'  total parameters    {stats["total_params"]:>14,}  ({stats["total_params"] / 1e6:.2f}M)')
  print(f'  gated filters       {stats["gated_filters"]:>14,}')
  print(
    f'  backbone MACs/image {stats["backbone_macs"]:>14,}  ({stats["backbone_macs"] / 1e6:.1f}M)'
  )
  print(f'  gater MACs/image    {stats["gater_macs"]:>14,}  ({stats["gater_macs"] / 1e6:.1f}M)')


def cmd_analyze(argv) -> None:
  del argv
  from gaternet_jax import gate_analysis  # noqa: PLC0415

  workdir = _require('workdir')
  gate_analysis.run(
    workdir,
    split=FLAGS.split,
    max_examples=FLAGS['max-examples'].value,
    out_dir=FLAGS.out,
    max_embed_examples=FLAGS['max-embed-examples'].value,
  )


def cmd_report(argv) -> None:
  from gaternet_jax import report  # noqa: PLC0415

  workdirs = argv[1:]
  if not workdirs:
    raise UserError('usage: gaternet report WORKDIR [WORKDIR ...] [--out table.md]')
  table = report.make_table(workdirs)
  print(table)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      f.write(table + '\n')


def parse_sweep(specs: list[str]) -> list[dict[str, str]]:
  """['a.b=1,2', 'c=x'] -> [{'a.b': '1', 'c': 'x'}, {'a.b': '2', 'c': 'x'}] (the grid)."""
  axes = []
  for spec in specs:
    field, sep, values = spec.partition('=')
    if not sep or not field or not values:
      raise UserError(f'--sweep {spec!r}: expected field=value1,value2,...')
    axes.append([(field.strip(), v.strip()) for v in values.split(',')])
  return [dict(combo) for combo in itertools.product(*axes)]


def cmd_sweep(argv) -> None:
  del argv
  import jax  # noqa: PLC0415
  from gaternet_jax import train  # noqa: PLC0415

  config, workdir = _config(), _require('workdir')
  grid = parse_sweep(FLAGS.sweep)
  if not grid:
    raise UserError('--sweep field=v1,v2 is required')
  for point in grid:
    run_config = config.copy_and_resolve_references()
    for field, value in point.items():
      _set_field(run_config, field, value)
    name = ','.join(f'{k}={v}' for k, v in point.items())
    results = train.train_and_evaluate(run_config, os.path.join(workdir, name))
    if jax.process_index() == 0:
      print(json.dumps({'point': point, **results}, sort_keys=True), flush=True)


def _set_field(config, field: str, text: str) -> None:
  """Sets a dotted field from text, parsed like a --config.<field>= override."""
  *parents, leaf = field.split('.')
  node = config
  for p in parents:
    if p not in node:
      raise UserError(f'--sweep: unknown config field {field!r}')
    node = node[p]
  if leaf not in node:
    raise UserError(f'--sweep: unknown config field {field!r}')
  current = node.get_ref(leaf).get_type() if hasattr(node, 'get_ref') else type(node[leaf])
  try:
    node[leaf] = _parse_value(text, current)
  except (TypeError, ValueError) as e:
    raise UserError(f'--sweep: bad value {text!r} for {field}: {e}') from None


def _parse_value(text: str, kind):
  if kind is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError('expected true/false')
  if kind in (int, float, str):
    return kind(text)
  import ast  # noqa: PLC0415

  return ast.literal_eval(text)


COMMAND_FUNCTIONS = {
  'train': cmd_train,
  'evaluate': cmd_evaluate,
  'describe': cmd_describe,
  'analyze': cmd_analyze,
  'report': cmd_report,
  'sweep': cmd_sweep,
}


if __name__ == '__main__':
  sys.exit('use the `gaternet` command')
