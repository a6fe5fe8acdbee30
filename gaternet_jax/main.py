"""The `gaternet` command: train, evaluate, describe, analyze, report, sweep.

  gaternet train    --config experiments/cifar10_resnet20.py[:variant] --workdir DIR [--config.x=v]
  gaternet evaluate --workdir DIR [--split S] [--step N] [--json]
  gaternet describe --config experiments/imagenet_resnet152.py[:variant] [--json] [--show_config]
  gaternet analyze  --workdir DIR [--split S] [--max-examples N] [--out DIR]
  gaternet report   DIR [DIR ...] [--out table.md]
  gaternet sweep    --config FILE --sweep field=v1,v2 [--sweep ...] --workdir DIR
  gaternet reproduce --config FILE[:gated] --seeds 0,1,2 [--epochs E] --workdir DIR
  gaternet compile  --config experiments/imagenet_resnet101.py[:variant] --topology v4-32 [--json]

`gaternet COMMAND --help` lists a command's flags. Errors caused by the user's input print one
line on stderr and exit with status 2.
"""

from __future__ import annotations

import sys

from gaternet_jax import environment, errors

COMMANDS = (
  'train', 'evaluate', 'describe', 'analyze', 'export', 'tradeoff', 'report', 'sweep', 'reproduce',
  'compile',
)  # fmt: skip


def _fail(message: str) -> None:
  print(f'gaternet: error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    if len(argv) >= 2 and argv[1] in ('-h', '--help', 'help'):
      print(__doc__)
      return
    _fail(
      f'usage: gaternet {{{",".join(COMMANDS)}}} [flags]; '
      f'got {argv[1] if len(argv) > 1 else "no command"!r}'
    )
  try:
    environment.check_switches()
  except errors.UserError as e:
    _fail(str(e))
  try:
    environment.prepare()  # before JAX starts
    if argv[1] == 'compile':
      environment.prepare_tpu_compile()
    from gaternet_jax import cli  # noqa: PLC0415

    cli.run(argv[1], [f'gaternet {argv[1]}'] + argv[2:], _fail)
  except KeyboardInterrupt:  # Ctrl-C before the command's own handler is in place (imports)
    print('gaternet: stopped by SIGINT before the command started', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  main()
