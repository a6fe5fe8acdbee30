"""The `gaternet` command: `gaternet --help` lists every command (gaternet_jax/usage.py), and
`gaternet COMMAND --help` that command's flags. Errors caused by the user's input print one line
on stderr and exit with status 2."""

from __future__ import annotations

import sys

from gaternet_jax import environment, errors, usage

COMMANDS = usage.COMMANDS


def _fail(message: str) -> None:
  print(f'gaternet: error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    if len(argv) >= 2 and argv[1] in ('-h', '--help', '--helpfull', 'help'):
      print(usage.overview())
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
