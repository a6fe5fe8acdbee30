"""Every `gaternet` command and its usage line: the one table `gaternet --help`, each command's
`--help` and the dispatch read (no JAX here: `main` reads it before JAX may start)."""

USAGE = {
  'train': 'gaternet train --config FILE[:variant] --workdir DIR [--config.FIELD=VALUE ...]',
  'evaluate': (
    'gaternet evaluate --workdir DIR [--split S] [--step N] [--gate_threshold T] '
    '[--skip_off_units] [--json]'
  ),
  'describe': 'gaternet describe --config FILE[:variant] [--json] [--show_config]',
  'analyze': 'gaternet analyze --workdir DIR [--split S] [--max_examples N] [--out DIR]',
  'export': 'gaternet export --workdir DIR [--split S] [--max_examples N] [--out DIR]',
  'tradeoff': 'gaternet tradeoff --workdir DIR [--split S] [--thresholds T1,T2,...] [--out DIR]',
  'report': 'gaternet report --workdir DIR [--workdir DIR ...] [--out table.md]   (or DIR DIR ...)',
  'sweep': (
    'gaternet sweep --config FILE --sweep FIELD=V1,V2 [--sweep ...] --workdir DIR '
    '[--vectorize [--member_map M]]'
  ),
  'reproduce': (
    'gaternet reproduce --config FILE[:gated] --seeds 0,1,2 [--epochs E] --workdir DIR '
    '[--vectorize [--member_map M]] [--summary_only] [--config.FIELD=VALUE ...]'
  ),
  'compile': (
    'gaternet compile --config FILE[:variant] --topology v4-32 [--json] [--config.FIELD=VALUE ...]'
  ),
}
COMMANDS = tuple(USAGE)

# What each command is for, in `gaternet --help`.
PURPOSE = {
  'train': "train a config (plain, or the paper's three-stage procedure when gated)",
  'evaluate': 'top-1/top-5 error, gate density and MACs used of a trained run',
  'describe': 'parameters, gated filters and MACs of a config; --show_config lists its fields',
  'analyze': "the gate census and the figures of the paper's section 4.2.1",
  'export': 'a pruned static model: always-off filters removed, always-on ones folded',
  'tradeoff': 'error vs MACs as the gate threshold moves',
  'report': "a Markdown table of finished runs next to the paper's numbers",
  'sweep': 'a grid over config fields, one resumable run per point, with a table and a figure',
  'reproduce': 'plain, gated and the control per seed, with a table and a figure',
  'compile': 'the training step compiled for a TPU slice here: HBM, FLOPs, projected speed',
}


def overview() -> str:
  """`gaternet --help`: every command, its purpose and its usage line."""
  lines = ['gaternet COMMAND [flags]; `gaternet COMMAND --help` lists its flags.', '']
  for command, usage in USAGE.items():
    lines += [f'  {command:<10} {PURPOSE[command]}', f'             {usage}']
  lines += [
    '',
    'Errors caused by the input print one line `gaternet: error: ...` and exit with status 2.',
  ]
  return '\n'.join(lines)
