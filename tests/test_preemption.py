"""The multi-host stop decision (`preemption.StopRequests.should_stop`) with the JAX preemption
service and the all-gather faked: which ids the service sees and when the hosts stop. The real
service is exercised end to end by `test_multiprocess.py`."""

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from gaternet_jax import preemption


@pytest.fixture
def two_hosts(monkeypatch):
  """Two processes; returns the ids given to the service and the other host's flags to set."""
  ids, other = [], {'flags': [0, 0], 'sync_point': None}
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(
    multihost_utils,
    'reached_preemption_sync_point',
    lambda step_id: ids.append(step_id) or step_id == other['sync_point'],
  )
  monkeypatch.setattr(
    multihost_utils,
    'process_allgather',
    lambda x: np.stack([np.asarray(x), np.asarray(other['flags'], np.int32)]),
  )
  monkeypatch.setattr(preemption, '_preemption_notice_posted', lambda: False)
  return ids, other


def test_the_service_sees_every_training_step_and_stops_at_its_sync_point(two_hosts):
  """Ids are training steps, one per step (Orbax reports checkpoint steps to the same service):
  a dispatch of several steps passes each of them."""
  ids, other = two_hosts
  other['sync_point'] = 7
  stop = preemption.StopRequests(start_step=2, sync_every=100)
  assert not stop.should_stop(4)
  assert stop.should_stop(8)  # the dispatch of steps 5-8 holds the sync point
  assert ids == [3, 4, 5, 6, 7, 8]
  assert stop.signal_name == 'SIGTERM' and stop.exit_code == 143


@pytest.mark.parametrize('flags,name,code', [([0, 1], 'SIGTERM', 143), ([1, 0], 'SIGINT', 130)])
def test_another_hosts_notice_or_ctrl_c_stops_both_at_the_agreement_step(
  two_hosts, flags, name, code
):
  """A notice the sync point missed (it landed between two stages) or a Ctrl-C on the other host
  stops this one too, at the next multiple of `sync_every`."""
  _, other = two_hosts
  other['flags'] = flags
  stop = preemption.StopRequests(start_step=0, sync_every=5)
  assert not stop.should_stop(3)  # not an agreement step: no all-gather
  assert stop.should_stop(5)
  assert stop.signal_name == name and stop.exit_code == code


def test_no_notice_without_a_distributed_client():
  assert preemption._preemption_notice_posted() is False
