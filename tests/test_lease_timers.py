"""Exact lease and heartbeat deadlines: an expired lease puts its task back to pending on the queue actor's
10 ms tick (not on the lease watcher's 10 s sweep), and a silent worker is declared dead at 2 × heartbeat
(from a heap of deadlines on the registry's short timer), so a late RESULT is NOT_LEASED."""

from __future__ import annotations

import time

import pytest

from actors.metrics import BrokerMetrics
from actors.registry import WorkerRegistryActor
from tests.helpers import wait_for
from transport.errors import NotLeased


def state_becomes(client, task_id: str, state: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    wait_for(lambda: client.status(task_id).state == state, timeout=timeout)


def test_a_claimed_task_with_a_200_ms_lease_is_pending_again_well_within_a_second_of_its_expiry(broker) -> None:
    client = broker.client()
    task_id = client.submit("job", b"x", queue="leases", lease_ms=200).task_id
    [job] = client.claim("w-slow", ["leases"])
    assert client.status(task_id).state == "running"
    state_becomes(client, task_id, "pending", timeout=2.0)  # the lease watcher's sweep is 10 s away
    info = client.status(task_id)
    assert info.attempts == 1 and info.error == "lease expired"
    with pytest.raises(NotLeased):
        client.complete("w-slow", job.task_id, b"too late")


def test_heartbeats_push_the_lease_expiry_forward_so_a_renewed_task_stays_running(broker) -> None:
    client = broker.client()
    task_id = client.submit("job", b"x", queue="renew", lease_ms=1500).task_id
    client.claim("w-busy", ["renew"])
    for _ in range(12):  # 2.4 s of work, heartbeating ten times per lease: well past the first expiry
        client.heartbeat("w-busy", [task_id])
        time.sleep(0.2)  # the worker's heartbeat rhythm, not a wait for the broker
        assert client.status(task_id).state == "running"
    state_becomes(client, task_id, "pending", timeout=5.0)  # once the heartbeats stop, the lease runs out


def test_a_worker_that_stops_heartbeating_is_declared_dead_and_its_task_reclaimed(make_broker) -> None:
    broker = make_broker(TQ_WORKER__HEARTBEAT_INTERVAL_SECS="0.3", TQ_BROKER__MAINTENANCE_INTERVAL_SECS="30")
    client = broker.client()
    task_id = client.submit("job", b"x", queue="dead", lease_ms=600_000).task_id  # the lease cannot do it
    client.register("w-gone", queues=["dead"])
    client.claim("w-gone", ["dead"])
    state_becomes(client, task_id, "pending", timeout=5.0)
    assert "worker declared dead" in broker.log()
    assert [w.alive for w in client.workers() if w.worker_id == "w-gone"] == [False]


class _Queue:
    def __init__(self) -> None:
        self.told: list[object] = []

    def tell(self, message: object) -> None:
        self.told.append(message)


def test_the_registry_declares_a_silent_worker_dead_exactly_at_twice_its_heartbeat_interval() -> None:
    registry = WorkerRegistryActor(heartbeat_interval_s=10.0, check_interval_s=60.0, metrics=BrokerMetrics())
    registry.queue = queue = _Queue()
    registry._known("w1", 1000.0)
    registry._check_due(1019.99)
    assert registry.workers["w1"].alive
    registry._check_due(1020.01)  # 2 × 10 s after its last sign of life, long before the 60 s sweep
    assert not registry.workers["w1"].alive
    assert [m.worker_id for m in queue.told] == ["w1"]  # type: ignore[attr-defined]


def test_a_heartbeat_moves_the_deadline_and_the_old_one_is_ignored() -> None:
    registry = WorkerRegistryActor(heartbeat_interval_s=10.0, check_interval_s=60.0, metrics=BrokerMetrics())
    registry.queue = _Queue()
    worker = registry._known("w1", 1000.0)
    worker.last_heartbeat = 1015.0
    registry._arm(worker)
    registry._check_due(1025.0)  # the first deadline (1020) passed, but the worker heartbeated at 1015
    assert worker.alive
    registry._check_due(1035.01)
    assert not worker.alive
    assert registry._deadlines == []
