"""Several processes (hosts): starting the JAX distributed runtime and deciding things together.

Every decision that leads to a collective or an Orbax barrier (does a checkpoint exist? is a stage
finished? is there a config to compare?) must come out the same on every host; a decision read
from shared storage may not, because another host may be writing it at that moment. `agree`
makes process 0 decide and broadcasts its answer, so control flow is identical everywhere.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np

from gaternet_jax import environment
from gaternet_jax.errors import UserError

T = TypeVar('T', bool, int)

# Variables a manual launch (GPU hosts started by hand, a VM group, local processes) sets, beside
# the coordinator's address; TPU pods and SLURM are detected by JAX itself.
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def cluster_detected(env=os.environ) -> bool:
  """Whether this process was started as one of several (a pod, an srun step, a manual launch)."""
  return (
    ENV_COORDINATOR in env
    # Inside an `srun` step only: an `salloc` shell has SLURM_NTASKS but no peers running.
    or ('SLURM_STEP_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1)
    or len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
  )


def initialize(
  mode: str = 'auto',
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  timeout_s: int = 300,
  env=os.environ,
) -> None:
  """Calls `jax.distributed.initialize()` when this is a multi-process launch.

  Args:
    mode: 'auto' (when a cluster is detected or an address is given), 'true' or 'false'.
    coordinator_address, num_processes, process_id: a manual launch's parameters; each falls
      back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    timeout_s: how long to wait for every process to join.
    env: the environment (tests pass their own).

  Raises:
    UserError: the processes could not meet, or the launch parameters are incomplete.
  """
  if mode == 'false':
    return
  address = coordinator_address or env.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID)
  if mode != 'true' and not address and not cluster_detected(env):
    return
  if address and (count is None) != (index is None):
    raise UserError(
      'a manual multi-process launch needs both the number of processes and this process id '
      f'(--num_processes/--process_id or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})'
    )
  if count is not None and not 0 <= (index or 0) < count:
    raise UserError(f'process id {index} is not in [0, {count})')
  if jax.config.jax_platforms in (None, '', 'cpu') and _cpu_only():
    # CPU processes need a collectives implementation to talk to each other at all.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count,
      process_id=index,
      initialization_timeout=timeout_s,
    )
  except (ValueError, RuntimeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    where = f' at {address}' if address else ''
    raise UserError(
      f'jax.distributed.initialize() failed{where}: {lines[0] if lines else type(e).__name__}'
    ) from None


def _env_int(env, name: str) -> int | None:
  text = env.get(name)
  if text in (None, ''):
    return None
  try:
    return int(text)
  except ValueError:
    raise UserError(f'{name} must be an integer, got {text!r}') from None


def _cpu_only() -> bool:
  return environment.cpu_only_install()


def agree(decide: Callable[[], T]) -> T:
  """Process 0's answer to `decide()`, on every process (one small broadcast when several).

  Only process 0 calls `decide`: it may read shared storage that other hosts see differently.
  """
  if jax.process_count() == 1:
    return decide()
  from jax.experimental import multihost_utils  # noqa: PLC0415

  value = decide() if jax.process_index() == 0 else 0
  # None (e.g. "no checkpoint") travels as _NONE; whether it is a bool travels beside it.
  # int32: JAX (without x64) carries int32; steps and flags fit.
  encoded = np.asarray([_encode(value), isinstance(value, bool)], np.int32)
  out = multihost_utils.broadcast_one_to_all(encoded)
  return _decode(int(out[0]), bool(out[1]))


def agree_json(decide: Callable[[], Any]) -> Any:
  """`agree` for any JSON value (a stored record, a list of steps): process 0's answer, sent as
  its JSON text's bytes after their count."""
  if jax.process_count() == 1:
    return decide()
  from jax.experimental import multihost_utils  # noqa: PLC0415

  text = json.dumps(decide()).encode() if jax.process_index() == 0 else b''
  size = agree(lambda: len(text))
  payload = np.zeros(size, np.int32)  # int32: what JAX carries without x64
  if jax.process_index() == 0:
    payload[:] = np.frombuffer(text, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(payload))
  return json.loads(out.astype(np.uint8).tobytes())


_NONE = -(2**31)  # int32's minimum; no step or flag is negative


def _encode(value) -> int:
  return _NONE if value is None else int(value)


def _decode(value: int, is_bool: bool):
  if value == _NONE:
    return None
  return bool(value) if is_bool else value


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called `name` (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def is_leader() -> bool:
  """Process 0: the one that writes the workdir's JSON files and holds its lock."""
  return jax.process_index() == 0
