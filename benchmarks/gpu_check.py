"""The prepared GPU check: one lease used fully, in calls of at most 9 minutes; one JSON line.

  python benchmarks/gpu_check.py --call A --data_dir DIR --out OUT [--work gpu_runs]
  python benchmarks/gpu_check.py --call B --data_dir DIR --out OUT [--work gpu_runs] [--l1_weight L]
  python benchmarks/gpu_check.py --call C --data_dir DIR --out OUT [--seeds 0,1,2] [--epochs 164]
  python benchmarks/gpu_check.py --call D --data_dir DIR --out OUT [--epochs 500]
  python benchmarks/gpu_check.py --call A --smoke --out OUT     # the CPU test of the same path

Call A: (1) docs/performance.md's GPU throughput table: ResNet-20 plain and gated, float32 and bfloat16,
batch 128 and 1024, training and inference images/s and compile seconds (benchmarks/throughput.py,
one child process per precision and batch); (2) the full 164-epoch plain ResNet-20 on the CIFAR-10
JPEGs (45k/5k hold-out), bfloat16, with its wall time split into setup, compilation (the first
dispatch), training, evaluation and checkpointing (results.json `time_split_s`).
Call B: the gated joint stage, 164 epochs, bfloat16, from call A's plain run (`init.backbone`, and
`init.gater`: the gater's extractor is a ResNet-20, the plain run's architecture) at the config's
lambda or `--l1_weight`, with the same split; then, last, benchmarks/population.py's vmapped
populations (K = 1, 2, 4, 8 ResNet-20 members in one program, float32, batch 128: issue 35's GPU
number). B must run on the machine A ran on (within its 30 s of warmth): A's run lives in `--work`,
an ignored folder of the working tree that stays there.
Call C, for a lease after A and B: issue 32's reproduction at full length on the GPU, `gaternet
reproduce --vectorize` (each run kind's seeds as one vmapped program) of ResNet-20 at --epochs per
stage on all 50,000 training JPEGs, bfloat16, the test split scored once per run. At --deadline_s
it is stopped with SIGTERM (it checkpoints); the same call on the same machine resumes it, and
every run that finished is recorded (its test error, gate density, wall time) either way.
Call D, issue 38's GPU run: ResNet-20-BaS (experiments/cifar10_resnet20_bas.py:bas) and then the
plain ResNet-20 of the same recipe (500 epochs, batch 256; --epochs E scales the schedules to E,
the same for both), bfloat16, on all 50,000 training JPEGs, the test split once per run; stopped at
--deadline_s and resumed by the same call; then `gaternet analyze` and `tradeoff` on the BaS run.

Every finished part is appended to OUT/gpu_check.jsonl at once and its output kept in
OUT/<part>.log, so a call cut off at its limit still returns what it finished; the last line
printed is the whole summary. `--smoke` swaps in the embedded default data, batch sizes 16/32 and a
few steps (and two of the four throughput points), so that a test runs this same path on the CPU (tests/test_benchmarks.py).

On the device machine (no network; no ml_collections there, and no TensorFlow, which this path
never needs), prepared here once:
  echo /.whl/ >> .git/info/exclude; echo /gpu_data/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
  mkdir -p gpu_data && cp ../shared/data/cifar10-jpeg-*.tar.gz gpu_data/
and each call (carry: .whl, gpu_data; 9-minute limit):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
  (ls gpu_data/train >/dev/null 2>&1 || for t in gpu_data/*.tar.gz; do tar -xzf $t -C gpu_data; done) && \\
  python3 benchmarks/gpu_check.py --call A --data_dir gpu_data --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'experiments', 'cifar10_resnet20.py')


def _run(part: str, command: list[str], out: str, timeout: float | None = None) -> str:
  """Runs `command` (output to OUT/<part>.log); its stdout; raises on failure."""
  started = time.time()
  result = subprocess.run(
    command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env(), check=False
  )
  with open(os.path.join(out, f'{part}.log'), 'w') as f:
    f.write(f'$ {" ".join(command)}\n{result.stdout}\n{result.stderr}\n')
    f.write(f'# exit {result.returncode} after {time.time() - started:.1f} s\n')
  if result.returncode:
    raise RuntimeError(f'{part} failed (exit {result.returncode}): {result.stderr[-800:]}')
  return result.stdout


def _env() -> dict[str, str]:
  """This checkout first on the children's path (the device machine installs nothing)."""
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))


def _record(out: str, summary: dict, part: str, value: dict) -> None:
  summary[part] = value
  with open(os.path.join(out, 'gpu_check.jsonl'), 'a') as f:
    f.write(json.dumps({'part': part, **value}) + '\n')


def throughput(out: str, summary: dict, smoke: bool) -> None:
  """ResNet-20 plain and gated at each precision and batch size: benchmarks/throughput.py."""
  config = os.path.join(REPO, 'experiments', 'default.py') if smoke else CONFIG
  grid = (
    [(False, 16), (True, 32)] if smoke else [(h, b) for h in (False, True) for b in (128, 1024)]
  )
  for half, batch in grid:
    part = f'throughput_{"bf16" if half else "f32"}_b{batch}'
    stdout = _run(
        part,
        [
          sys.executable, os.path.join(REPO, 'benchmarks', 'throughput.py'), f'--config={config}',
          f'--batch_size={batch}', f'--half_precision={half}', '--rounds=1' if smoke else '--rounds=3',
          '--steps=2' if smoke else '--steps=50',
        ],
        out,
      )  # fmt: skip
    _record(out, summary, part, json.loads(stdout.strip().splitlines()[-1]))


def _train(part: str, variant: str, args, out: str, extra: list[str]) -> dict:
  """`gaternet train` of ResNet-20 (`variant`) in --work/<part>; its results.json."""
  workdir = os.path.join(args.work, part)
  if args.smoke:
    data = ['--config.data.holdout=300', '--config.max_steps=6', '--config.eval_every_epochs=100']
    config = os.path.join(REPO, 'experiments', 'default.py')
  else:
    data = [
      '--config.data.name=imagefolder', f'--config.data.data_dir={os.path.abspath(args.data_dir)}',
      '--config.data.holdout=5000',
    ]  # fmt: skip
    config = CONFIG
  command = [
    sys.executable, '-m', 'gaternet_jax.main', 'train', f'--config={config}:{variant}',
    f'--workdir={workdir}', '--config.data.eval_split=holdout', '--config.half_precision=True',
    *data, *extra,
  ]  # fmt: skip
  _run(part, command, out)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  keep = ('step', 'total_steps', 'wall_time_s', 'time_split_s', 'eval', 'stages')
  return {k: results[k] for k in keep if k in results}


def call_a(args, out: str, summary: dict) -> None:
  throughput(out, summary, args.smoke)
  _record(out, summary, 'plain_164_epochs', _train('plain', 'plain', args, out, []))


def call_b(args, out: str, summary: dict) -> None:
  plain = os.path.join(args.work, 'plain')
  if not os.path.exists(os.path.join(plain, 'results.json')):
    raise SystemExit(f"gpu_check: call B needs call A's finished plain run in {plain}")
  extra = [f'--config.init.backbone={plain}', f'--config.init.gater={plain}']
  if args.l1_weight is not None:
    extra.append(f'--config.gating.l1_weight={args.l1_weight}')
  _record(out, summary, 'gated_joint_164_epochs', _train('gated', 'gated', args, out, extra))
  population(out, summary, args.smoke)


def population(out: str, summary: dict, smoke: bool) -> None:
  """What K members in one vmapped program buy (benchmarks/population.py), last: a call cut off
  at its limit loses only this."""
  if smoke:
    flags = [
      '--config',
      os.path.join(REPO, 'experiments', 'default.py'),
      '--members',
      '1,2',
      '--variants',
      'gated',
      '--steps',
      '1',
      '--rounds',
      '1',
      '--examples',
      '400',
    ]
  else:
    flags = ['--config', CONFIG, '--members', '1,2,4,8', '--steps', '50', '--rounds', '2']
  stdout = _run(
    'population',
    [sys.executable, os.path.join(REPO, 'benchmarks', 'population.py'), '--member_maps', 'vmap',
     *flags],
    out,
  )  # fmt: skip
  _record(out, summary, 'population_vmap', json.loads(stdout.strip().splitlines()[-1]))


def _run_until(part: str, command: list[str], out: str, seconds: float, grace: float = 60) -> int:
  """Runs a resumable gaternet command (output appended to OUT/<part>.log); at `seconds` it is
  sent SIGTERM, on which it checkpoints the step it is at and exits 143, and killed if it has not
  ended `grace` seconds later (so that the call still records what finished). Its exit status."""
  with open(os.path.join(out, f'{part}.log'), 'a') as log:
    log.write(f'$ {" ".join(command)}\n')
    log.flush()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, env=_env())
    try:
      return process.wait(timeout=max(seconds, 0))
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGTERM)
      try:
        return process.wait(timeout=grace)
      except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _data_flags(args) -> tuple[str, list[str]]:
  """Call C and D's data: all 50,000 training JPEGs, the test split scored once at the end (or,
  with --smoke, the embedded default and a few steps); the config file to use with them."""
  if args.smoke:
    return os.path.join(REPO, 'experiments', 'default.py'), [
      '--config.max_steps=6', '--config.checkpoint_every_steps=3',
    ]  # fmt: skip
  return CONFIG, [
    '--config.data.name=imagefolder', f'--config.data.data_dir={os.path.abspath(args.data_dir)}',
  ]  # fmt: skip


def call_c(args, out: str, summary: dict) -> None:
  workdir = os.path.join(args.work, 'reproduce')
  config, budget = _data_flags(args)
  command = [
    sys.executable, '-m', 'gaternet_jax.main', 'reproduce', f'--config={config}',
    f'--workdir={workdir}', f'--seeds={args.seeds}', f'--epochs={args.epochs or 164:g}',
    '--vectorize',
    '--config.half_precision=True', '--config.eval_every_epochs=1000', *budget,
  ]  # fmt: skip
  if args.l1_weight is not None:
    command.append(f'--config.gating.l1_weight={args.l1_weight}')
  started = time.time()
  returncode = _run_until('reproduce', command, out, args.deadline_s)
  runs = {}
  for seed in args.seeds.split(','):
    for kind in ('plain', 'gated', 'control'):
      results = os.path.join(workdir, f'seed{seed}', kind, 'results.json')
      if os.path.exists(results):
        with open(results) as f:
          r = json.load(f)
        runs[f'seed{seed}/{kind}'] = {k: r[k] for k in ('step', 'wall_time_s', 'eval') if k in r}
  part = {'returncode': returncode, 'wall_s': round(time.time() - started, 1), 'finished': runs}
  table = os.path.join(workdir, 'reproduce.json')
  if returncode == 0 and os.path.exists(table):
    with open(table) as f:
      part['summary'] = json.load(f)
  _record(out, summary, 'reproduce_vectorized', part)


def call_d(args, out: str, summary: dict) -> None:
  """Issue 38: ResNet-20-BaS, then plain ResNet-20, at Batch-Shaping's CIFAR-10 recipe (500
  epochs, batch 256; --epochs E scales its schedules to E), bfloat16; each stopped at the call's
  deadline and resumed by the same call; `analyze` and `tradeoff` on the BaS run once it ends."""
  deadline = time.time() + args.deadline_s
  config, data = _data_flags(args)
  if not args.smoke:
    config = os.path.join(REPO, 'experiments', 'cifar10_resnet20_bas.py')
  bas = os.path.join(args.work, 'bas_bas')
  for variant in ('bas', 'plain'):
    workdir = os.path.join(args.work, f'bas_{variant}')
    results = os.path.join(workdir, 'results.json')
    if not os.path.exists(results) and deadline - time.time() > 30:
      command = [
        sys.executable, '-m', 'gaternet_jax.main', 'train', f'--config={config}:{variant}',
        f'--workdir={workdir}', '--config.half_precision=True', '--config.eval_every_epochs=1000',
        *data, *([] if args.epochs is None else [f'--config.schedule.num_epochs={args.epochs}']),
      ]  # fmt: skip
      returncode = _run_until(f'bas_{variant}', command, out, deadline - time.time())
      _record(out, summary, f'bas_{variant}_train', {'returncode': returncode})
    if os.path.exists(results):
      with open(results) as f:
        r = json.load(f)
      keep = ('step', 'total_steps', 'wall_time_s', 'time_split_s', 'eval')
      _record(out, summary, f'bas_{variant}', {k: r[k] for k in keep if k in r})
  if not os.path.exists(os.path.join(bas, 'results.json')):
    return
  for command_name, made in (
    ('analyze', 'analysis/analysis.json'),
    ('tradeoff', 'tradeoff/tradeoff.json'),
  ):
    if not os.path.exists(os.path.join(bas, made)) and deadline - time.time() > 20:
      command = [sys.executable, '-m', 'gaternet_jax.main', command_name, f'--workdir={bas}']
      _run_until(f'bas_{command_name}', command, out, deadline - time.time())
  analysis = os.path.join(bas, 'analysis', 'analysis.json')
  if os.path.exists(analysis):
    with open(analysis) as f:
      a = json.load(f)
    part = {'census': a['census']['totals'], 'compute': a['compute'], 'split': a['split']}
    _record(out, summary, 'bas_analyze', {**part, 'gates_per_example': a['gates_per_example']})
  tradeoff = os.path.join(bas, 'tradeoff', 'tradeoff.json')
  if os.path.exists(tradeoff):
    with open(tradeoff) as f:
      _record(out, summary, 'bas_tradeoff', json.load(f))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--call', choices=('A', 'B', 'C', 'D'), required=True)
  parser.add_argument('--data_dir', help='the CIFAR-10 JPEG folder (train/...), not for --smoke')
  parser.add_argument('--out', required=True, help='where the JSON lines and logs go ($OUT)')
  parser.add_argument('--work', default=os.path.join(REPO, 'gpu_runs'), help='the runs, kept')
  parser.add_argument('--l1_weight', type=float, default=None)
  parser.add_argument('--smoke', action='store_true', help='embedded data, tiny budget (CPU)')
  parser.add_argument('--seeds', default='0,1,2', help='call C: the seeds')
  parser.add_argument(
    '--epochs', type=float, default=None, help="C: epochs per stage (164); D: the recipe's (500)"
  )
  parser.add_argument('--deadline_s', type=float, default=510, help='C, D: stop (resumable)')
  args = parser.parse_args(argv)
  if not args.smoke and not args.data_dir:
    parser.error('--data_dir is required (the CIFAR-10 JPEGs), except with --smoke')
  os.makedirs(args.out, exist_ok=True)
  summary: dict = {'call': args.call, 'smoke': args.smoke}
  started = time.time()
  try:
    {'A': call_a, 'B': call_b, 'C': call_c, 'D': call_d}[args.call](args, args.out, summary)
  finally:
    summary['wall_s'] = round(time.time() - started, 1)
    print(json.dumps(summary))


if __name__ == '__main__':
  main()
