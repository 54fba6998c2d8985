"""Protocol conformance, part 3: behaviour over time (docs/protocol.md "Task states", "Frames", "Authentication").

Scheduled tasks, long-poll claims, leases and heartbeats, retries with backoff, dead workers,
deregistration, auto-registration, backpressure, the connection limit, the idle timeout, authentication
and protected mode, durability across kill -9 ("Durability"), SIGTERM, and start-up failures. Timers are
set small and every wait polls against a deadline; timing is asserted only within generous bounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import ROOT, BrokerProcess
from helpers import RawConn, wait_for

from tests.helpers import non_loopback_ipv4
from transport import messages as m
from transport.client import Client
from transport.errors import BadRequest, InvalidState, NotLeased, QueueFull, TooManyConnections, Unauthorized
from transport.frames import FrameReader

HEARTBEAT_S = 1.0
BACKOFF_BASE_MS = 100
BACKOFF_MAX_MS = 150
FAST_TIMERS = {
    "TQ_WORKER__HEARTBEAT_INTERVAL_SECS": str(HEARTBEAT_S),
    "TQ_BROKER__MAINTENANCE_INTERVAL_SECS": "0.5",
    "TQ_BROKER__LEASE_CHECK_INTERVAL_SECS": "0.2",
    "TQ_BROKER__RETRY_BACKOFF_BASE_MS": str(BACKOFF_BASE_MS),
    "TQ_BROKER__RETRY_BACKOFF_MAX_MS": str(BACKOFF_MAX_MS),
}
HEADER = struct.Struct(">IB")
STATS, HELLO = 0x09, 0x01


# ---------------------------------------------------------------- helpers




def frame(type_byte: int, **fields: Any) -> bytes:
    payload = msgspec.msgpack.encode(fields)
    return HEADER.pack(len(payload) + 1, type_byte) + payload


def start_broker(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> BrokerProcess:
    return BrokerProcess(tmp_path_factory.mktemp(name) / "data", env).start()


def status(client: Client, task_id: str) -> m.TaskInfo:
    return client.status(task_id)


def worker_info(client: Client, worker_id: str) -> m.WorkerInfo | None:
    return next((w for w in client.workers() if w.worker_id == worker_id), None)


def one(tasks: list[m.Assignment]) -> m.Assignment:
    assert len(tasks) == 1, tasks
    return tasks[0]


@pytest.fixture(scope="module")
def fast_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = start_broker(tmp_path_factory, "lifecycle", **FAST_TIMERS)
    yield broker
    broker.stop()


@pytest.fixture
def client(fast_broker: BrokerProcess) -> Iterator[Client]:
    c = Client("127.0.0.1", fast_broker.port, timeout=10.0)
    yield c
    c.close()


@pytest.fixture
def queue() -> str:
    return f"lq-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def worker() -> str:
    return f"lw-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- scheduled tasks


def test_a_scheduled_task_is_not_claimable_before_run_at_and_is_claimable_soon_after(
    client: Client, queue: str, worker: str,
) -> None:
    run_at = time.time() + 0.6
    task_id = client.submit("lc.later", queue=queue, run_at=run_at).task_id
    assert status(client, task_id).state == "scheduled"
    claimed = None
    while claimed is None:
        tasks = client.claim(worker, [queue])
        now = time.time()
        if tasks:
            claimed = (tasks[0], now)
        else:
            assert now < run_at + 2.0, "the task did not become claimable within 2 s of its run_at"
            time.sleep(0.01)
    assignment, claimed_at = claimed
    assert assignment.task_id == task_id
    assert claimed_at >= run_at - 0.001, "claimed before its run_at"
    assert claimed_at <= run_at + 1.0


def test_a_scheduled_task_is_pending_once_its_run_at_has_passed(client: Client, queue: str) -> None:
    run_at = time.time() + 0.3
    task_id = client.submit("lc.later", queue=queue, run_at=run_at).task_id
    wait_for(lambda: status(client, task_id).state == "pending", timeout=3.0)
    assert time.time() >= run_at - 0.001


def test_a_waiting_claim_receives_a_scheduled_task_when_its_run_at_comes(
    client: Client, queue: str, worker: str,
) -> None:
    run_at = time.time() + 0.5
    task_id = client.submit("lc.later", queue=queue, run_at=run_at).task_id
    assignment = one(client.claim(worker, [queue], wait_ms=5000))
    got_at = time.time()
    assert assignment.task_id == task_id
    assert run_at - 0.001 <= got_at <= run_at + 1.5


def test_a_promoted_scheduled_task_queues_behind_tasks_already_pending(
    client: Client, queue: str, worker: str,
) -> None:
    scheduled = client.submit("lc.fifo", queue=queue, run_at=time.time() + 0.3).task_id
    earlier = client.submit("lc.fifo", queue=queue).task_id
    wait_for(lambda: status(client, scheduled).state == "pending", timeout=3.0)
    later = client.submit("lc.fifo", queue=queue).task_id
    assert [a.task_id for a in client.claim(worker, [queue], max_tasks=3)] == [earlier, scheduled, later]


def test_a_task_whose_lease_expired_queues_behind_tasks_already_pending(
    client: Client, queue: str, worker: str,
) -> None:
    expired = client.submit("lc.fifo", queue=queue, lease_ms=200).task_id
    one(client.claim(worker, [queue]))
    waiting = client.submit("lc.fifo", queue=queue).task_id
    wait_for(lambda: status(client, expired).state == "pending", timeout=3.0)
    assert [a.task_id for a in client.claim(worker + "-2", [queue], max_tasks=2)] == [waiting, expired]


# ---------------------------------------------------------------- long-poll claims


def test_a_waiting_claim_is_woken_by_a_submit_from_another_connection(
    fast_broker: BrokerProcess, client: Client, queue: str, worker: str,
) -> None:
    started = time.monotonic()
    pending = client.send_async(m.Claim(id=0, worker_id=worker, queues=["elsewhere-" + queue, queue],
                                        max_tasks=1, wait_ms=10_000))
    time.sleep(0.3)  # let the claim start waiting: the point is that the submit wakes it
    assert not pending.done()
    with fast_broker.client() as producer:
        task_id = producer.submit("lc.wake", b"hi", queue=queue).task_id
    reply = pending.get(timeout=5.0)
    assert isinstance(reply, m.Assigned)
    assert [a.task_id for a in reply.tasks] == [task_id]
    assert reply.tasks[0].attempt == 1
    assert time.monotonic() - started < 5.0


def test_a_waiting_claim_that_times_out_gets_an_empty_assigned(
    client: Client, queue: str, worker: str,
) -> None:
    started = time.monotonic()
    reply = client.request(m.Claim(id=0, worker_id=worker, queues=[queue], max_tasks=3, wait_ms=400))
    elapsed = time.monotonic() - started
    assert isinstance(reply, m.Assigned)
    assert reply.tasks == []
    assert 0.35 <= elapsed <= 3.0


def test_a_wait_ms_over_60000_is_clamped_not_refused(client: Client, queue: str, worker: str) -> None:
    pending = client.send_async(m.Claim(id=0, worker_id=worker, queues=[queue], max_tasks=1,
                                        wait_ms=10**12), timeout=10.0)
    time.sleep(0.2)  # let the claim start waiting
    assert not pending.done()
    with Client("127.0.0.1", client.port, timeout=5.0) as producer:
        task_id = producer.submit("lc.clamp", queue=queue).task_id
    reply = pending.get(timeout=5.0)
    assert [a.task_id for a in reply.tasks] == [task_id]  # type: ignore[attr-defined]


def test_waiting_claims_are_served_oldest_first_and_each_task_goes_to_one_claim(
    fast_broker: BrokerProcess, client: Client, queue: str, worker: str,
) -> None:
    other = fast_broker.client()
    try:
        first = client.send_async(m.Claim(id=0, worker_id=worker, queues=[queue], max_tasks=1, wait_ms=8000))
        time.sleep(0.1)  # fixes which claim waited longer
        second = other.send_async(m.Claim(id=0, worker_id=worker + "-b", queues=[queue], max_tasks=1,
                                          wait_ms=8000))
        time.sleep(0.1)
        a = client.submit("lc.one", queue=queue).task_id
        reply = first.get(timeout=5.0)
        assert [t.task_id for t in reply.tasks] == [a]  # type: ignore[attr-defined]
        assert not second.done()
        b = client.submit("lc.two", queue=queue).task_id
        assert [t.task_id for t in second.get(timeout=5.0).tasks] == [b]  # type: ignore[attr-defined]
    finally:
        other.close()


def test_a_waiting_claim_whose_connection_closed_is_not_handed_a_task(
    fast_broker: BrokerProcess, client: Client, queue: str, worker: str,
) -> None:
    open_before = client.stats().connections
    gone = fast_broker.client()
    gone.send_async(m.Claim(id=0, worker_id=worker + "-gone", queues=[queue], max_tasks=1, wait_ms=10_000))
    time.sleep(0.2)  # let the claim start waiting
    gone.close()
    wait_for(lambda: client.stats().connections == open_before)
    task_id = client.submit("lc.orphan", queue=queue).task_id
    assert [a.task_id for a in client.claim(worker, [queue])] == [task_id]


# ---------------------------------------------------------------- leases


def test_an_expired_lease_returns_the_task_to_pending_with_the_run_counted(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("lc.lease", queue=queue, lease_ms=200, max_retries=3).task_id
    assert one(client.claim(worker, [queue])).attempt == 1
    info = wait_for(lambda: (i := status(client, task_id)).state == "pending" and i, timeout=3.0)
    assert info.attempts == 1
    assert info.worker_id is None
    # Claim and finish in one send, so the new 200 ms lease cannot run out in between.
    assigned, done = client.pipeline([
        m.Claim(id=0, worker_id=worker + "-next", queues=[queue], max_tasks=1, wait_ms=0),
        m.Result(id=0, worker_id=worker + "-next", task_id=task_id, ok=True),
    ])
    assert [(a.task_id, a.attempt) for a in assigned.tasks] == [(task_id, 2)]
    assert isinstance(done, m.Ok)


def test_a_result_from_the_worker_whose_lease_expired_is_not_leased_and_changes_nothing(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("lc.lease", queue=queue, lease_ms=200).task_id
    one(client.claim(worker, [queue]))
    wait_for(lambda: status(client, task_id).state == "pending", timeout=3.0)
    with pytest.raises(NotLeased):
        client.complete(worker, task_id, b"too late")
    assert status(client, task_id).state == "pending"
    newcomer = worker + "-new"
    # All in one send, so the newcomer's own 200 ms lease cannot run out in between.
    assigned, late, info, done, final = client.pipeline([
        m.Claim(id=0, worker_id=newcomer, queues=[queue], max_tasks=1, wait_ms=0),
        m.Result(id=0, worker_id=worker, task_id=task_id, ok=True, result=b"still too late"),
        m.Status(id=0, task_id=task_id),
        m.Result(id=0, worker_id=newcomer, task_id=task_id, ok=True, result=b"ok"),
        m.Status(id=0, task_id=task_id),
    ], return_exceptions=True)
    assert [a.task_id for a in assigned.tasks] == [task_id]
    assert isinstance(late, NotLeased)
    assert (info.task.state, info.task.worker_id) == ("running", newcomer)
    assert isinstance(done, m.Ok)
    assert (final.task.state, final.task.result) == ("completed", b"ok")


def test_an_expired_lease_with_no_retries_left_fails_the_task(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("lc.lease", queue=queue, lease_ms=200, max_retries=0).task_id
    one(client.claim(worker, [queue]))
    info = wait_for(lambda: (i := status(client, task_id)).state != "running" and i, timeout=3.0)
    assert info.state == "failed"
    assert info.attempts == 1


def test_a_heartbeat_renews_the_leases_it_names_and_keeps_its_worker_alive(
    client: Client, queue: str, worker: str,
) -> None:
    specs = [m.TaskSpec(kind="lc.hb", queue=queue, lease_ms=800) for _ in range(2)]
    kept, dropped = client.submit_batch(specs)
    assert {a.task_id for a in client.claim(worker, [queue], max_tasks=2)} == {kept, dropped}
    deadline = time.monotonic() + 2.5 * HEARTBEAT_S  # past both the 800 ms lease and 2 x heartbeat
    while time.monotonic() < deadline:
        client.heartbeat(worker, [kept], cpu_percent=1.0, memory_bytes=1)
        time.sleep(0.1)
    kept_info = status(client, kept)
    assert (kept_info.state, kept_info.worker_id, kept_info.attempts) == ("running", worker, 1)
    assert status(client, dropped).state == "pending"
    info = worker_info(client, worker)
    assert info is not None and info.alive is True
    assert info.running == [kept]
    client.complete(worker, kept)


# ---------------------------------------------------------------- retries with backoff


def test_result_not_ok_retries_after_exponential_backoff_capped_at_the_max_then_fails(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("lc.retry", queue=queue, max_retries=3).task_id
    for attempt in (1, 2, 3):
        assignment = one(client.claim(worker, [queue], wait_ms=3000))
        assert (assignment.task_id, assignment.attempt) == (task_id, attempt)
        sent = time.time()
        client.fail(worker, task_id, f"failure {attempt}")
        answered = time.time()
        info = status(client, task_id)
        # scheduled until its run_at; a loaded machine may only look after that
        assert info.state == "scheduled" or (info.state == "pending" and time.time() >= info.run_at), info
        assert info.attempts == attempt
        assert info.error == f"failure {attempt}"
        delay_s = min(BACKOFF_BASE_MS * 2 ** (attempt - 1), BACKOFF_MAX_MS) / 1000
        assert sent + 0.8 * delay_s - 0.01 <= info.run_at <= answered + 1.2 * delay_s + 0.01, (attempt, info)
        wait_for(lambda: status(client, task_id).state == "pending", timeout=3.0)
    assert one(client.claim(worker, [queue], wait_ms=3000)).attempt == 4
    client.fail(worker, task_id, "last straw")
    info = status(client, task_id)
    assert (info.state, info.attempts, info.error) == ("failed", 4, "last straw")


# ---------------------------------------------------------------- workers


def test_a_worker_silent_for_two_heartbeat_intervals_is_dead_and_its_tasks_are_pending_again(
    client: Client, queue: str, worker: str,
) -> None:
    client.register(worker, name="silent")
    task_id = client.submit("lc.dead", queue=queue, lease_ms=600_000).task_id
    last_chance = client.submit("lc.dead", queue=queue, lease_ms=600_000, max_retries=0).task_id
    started = time.monotonic()
    assert len(client.claim(worker, [queue], max_tasks=2)) == 2
    info = wait_for(lambda: (i := status(client, task_id)).state == "pending" and i, timeout=6.0,
                    interval=0.1)
    elapsed = time.monotonic() - started
    assert elapsed >= 2 * HEARTBEAT_S - 0.2, f"declared dead after only {elapsed:.2f} s"
    assert info.attempts == 1  # the run counted
    assert status(client, last_chance).state == "failed"  # no retries left
    dead = worker_info(client, worker)
    assert dead is not None and dead.alive is False
    assert dead.running == []
    with pytest.raises(NotLeased):
        client.complete(worker, task_id, b"from the dead")
    assert one(client.claim(worker + "-2", [queue])).attempt == 2


def test_a_dead_worker_that_claims_again_without_heartbeats_is_again_reclaimed(
    client: Client, queue: str, worker: str,
) -> None:
    client.claim(worker, [queue])  # auto-registers it; it never heartbeats
    wait_for(lambda: (w := worker_info(client, worker)) is not None and not w.alive, timeout=6.0,
             interval=0.1)
    task_id = client.submit("lc.dead", queue=queue, lease_ms=600_000).task_id
    one(client.claim(worker, [queue]))
    # Still silent: 2 x heartbeat interval later its task must be back to pending.
    deadline = time.monotonic() + 3 * HEARTBEAT_S + 2.0
    while status(client, task_id).state != "pending":
        if time.monotonic() > deadline:
            info = worker_info(client, worker)
            pytest.fail(f"a silent worker kept its task for {3 * HEARTBEAT_S + 2.0:.0f} s; WORKERS says "
                        f"alive={info and info.alive}, running={info and info.running}")
        time.sleep(0.1)


def test_deregister_returns_held_tasks_to_pending_at_once_and_uncounts_the_run(
    client: Client, queue: str, worker: str,
) -> None:
    client.register(worker)
    first, second = client.submit_batch([m.TaskSpec(kind="lc.dereg", queue=queue, lease_ms=600_000)
                                         for _ in range(2)])
    one(client.claim(worker, [queue]))
    client.fail(worker, first, "first run failed")  # a counted run; retried after the 100 ms backoff
    wait_for(lambda: status(client, first).state == "pending", timeout=3.0)
    held = {a.task_id for a in client.claim(worker, [queue], max_tasks=2)}
    assert held == {first, second}
    client.deregister(worker)
    a, b = status(client, first), status(client, second)
    assert (a.state, a.attempts) == ("pending", 1)
    assert (b.state, b.attempts) == ("pending", 0)


def test_a_claim_from_an_unknown_worker_id_registers_it(client: Client, queue: str, worker: str) -> None:
    client.claim(worker, [queue])
    info = wait_for(lambda: worker_info(client, worker), timeout=3.0)
    assert info.alive is True
    assert isinstance(info.last_heartbeat, float)


def test_a_heartbeat_from_an_unknown_worker_id_registers_it(client: Client, worker: str) -> None:
    client.heartbeat(worker, [], cpu_percent=33.0, memory_bytes=123456)
    info = wait_for(lambda: worker_info(client, worker), timeout=3.0)
    assert info.alive is True
    assert (info.cpu_percent, info.memory_bytes) == (33.0, 123456)


def test_an_auto_registered_worker_that_stays_silent_is_declared_dead(client: Client, queue: str,
                                                                      worker: str) -> None:
    client.claim(worker, [queue])
    wait_for(lambda: (w := worker_info(client, worker)) is not None and not w.alive, timeout=6.0,
             interval=0.1)


# ---------------------------------------------------------------- backpressure


def test_submits_at_queue_depth_threshold_are_refused_queue_full_until_a_cancel_makes_room(
    make_broker: Any,
) -> None:
    broker = make_broker(TQ_BROKER__QUEUE_DEPTH_THRESHOLD="5")
    client = broker.client()
    ids = [client.submit("bp", queue="bp", priority=i).task_id for i in range(5)]
    with pytest.raises(QueueFull):
        client.submit("bp", queue="bp")
    with pytest.raises(QueueFull):
        client.submit_batch([m.TaskSpec(kind="bp", queue="bp")])
    with pytest.raises(QueueFull):
        client.submit_batch([m.TaskSpec(kind="bp", queue="bp") for _ in range(3)])
    stats = client.stats()
    assert stats.pending == 5
    assert stats.submitted_total == 5
    client.cancel(ids[0])
    client.submit("bp", queue="bp")  # a cancel made room


def test_scheduled_tasks_count_toward_the_depth_and_running_ones_do_not(make_broker: Any) -> None:
    broker = make_broker(TQ_BROKER__QUEUE_DEPTH_THRESHOLD="5")
    client = broker.client()
    client.submit_batch([m.TaskSpec(kind="bp", queue="bp", run_at=time.time() + 3600) for _ in range(3)])
    client.submit_batch([m.TaskSpec(kind="bp", queue="bp") for _ in range(2)])
    with pytest.raises(QueueFull):
        client.submit("bp", queue="bp")
    claimed = one(client.claim("bp-worker", ["bp"]))  # running: no longer counts
    client.submit("bp", queue="bp")
    with pytest.raises(QueueFull):
        client.submit("bp", queue="bp")
    client.complete("bp-worker", claimed.task_id)
    q = client.stats().queues["bp"]
    assert (q.scheduled, q.pending, q.running) == (3, 2, 0)


def test_a_batch_is_accepted_whole_or_not_at_all(make_broker: Any) -> None:
    broker = make_broker(TQ_BROKER__QUEUE_DEPTH_THRESHOLD="5")
    client = broker.client()
    client.submit_batch([m.TaskSpec(kind="bp", queue="bp") for _ in range(3)])
    try:
        ids = client.submit_batch([m.TaskSpec(kind="bp", queue="bp") for _ in range(4)])
    except QueueFull:
        ids = []
    assert len(ids) in (0, 4)
    assert client.stats().pending == 3 + len(ids), "a batch was accepted in part"


# ---------------------------------------------------------------- connection limit


def test_one_connection_over_max_connections_is_refused_and_the_others_keep_working(make_broker: Any) -> None:
    broker = make_broker(TQ_BROKER__MAX_CONNECTIONS="3")
    clients = [broker.client()]
    wait_for(lambda: clients[0].stats().connections == 1)  # the start-up probe has been counted out
    clients += [broker.client(), broker.client()]
    raw = RawConn(broker.port)
    try:
        kind, body = raw.recv_frame(timeout=3.0)
        assert kind == 0x7F
        assert (body["id"], body["code"]) == (0, "TOO_MANY_CONNECTIONS")
        assert raw.wait_closed(timeout=3.0) is not None, "the refused connection was left open"
    finally:
        raw.close()
    with pytest.raises(TooManyConnections):
        broker.client()
    for i, c in enumerate(clients):
        c.submit("limit", queue="limit", priority=i)
        assert c.stats().connections == 3
    clients.pop().close()
    newcomer = wait_for(lambda: _try_client(broker), timeout=3.0)
    assert newcomer.stats().connections == 3


def _try_client(broker: BrokerProcess) -> Client | None:
    try:
        return broker.client()
    except TooManyConnections:
        return None


# ---------------------------------------------------------------- idle timeout


@pytest.fixture(scope="module")
def idle_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = start_broker(tmp_path_factory, "idle", TQ_BROKER__CONNECTION_TIMEOUT_SECS="1")
    yield broker
    broker.stop()


def test_an_idle_connection_is_closed_after_connection_timeout_secs(idle_broker: BrokerProcess) -> None:
    raw = RawConn(idle_broker.port)
    try:
        raw.send(frame(STATS, id=1))
        assert raw.recv_frame()[1]["id"] == 1
        closed_after = raw.wait_closed(timeout=6.0)
        assert closed_after is not None, "an idle connection was not closed"
        assert 0.8 <= closed_after <= 5.0
    finally:
        raw.close()


def test_a_connection_that_keeps_sending_is_not_closed(idle_broker: BrokerProcess) -> None:
    raw = RawConn(idle_broker.port)
    try:
        for i in range(5):  # 2 s in all, twice the timeout, never 1 s silent
            raw.send(frame(STATS, id=i))
            assert raw.recv_frame()[1]["id"] == i
            time.sleep(0.4)
    finally:
        raw.close()


def test_a_connection_with_a_waiting_claim_is_not_closed_while_it_waits(idle_broker: BrokerProcess) -> None:
    raw = RawConn(idle_broker.port)
    try:
        started = time.monotonic()
        raw.send(frame(0x04, id=7, worker_id="idle-w", queues=["idle"], max_tasks=1, wait_ms=2500))
        kind, body = raw.recv_frame(timeout=6.0)
        assert (kind, body["id"], body["tasks"]) == (0x44, 7, [])
        assert time.monotonic() - started >= 2.4
        closed_after = raw.wait_closed(timeout=5.0)
        assert closed_after is not None, "idle after its claim was answered, but never closed"
    finally:
        raw.close()


def test_a_client_that_never_reads_its_replies_is_disconnected_after_the_idle_timeout(
    idle_broker: BrokerProcess,
) -> None:
    """The broker's send to it blocks once the socket buffers are full; the idle close must end that too."""
    c = idle_broker.client()
    for n in range(100):  # 100 queues make every STATS reply a few KiB
        c.submit("idle.fat", queue=f"idle-fat-{n:03d}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    try:
        sock.connect(("127.0.0.1", idle_broker.port))
        host, port = sock.getsockname()
        peer = f"{host}:{port}"
        sent = 2000  # megabytes of replies: far more than the kernel buffers hold
        sock.sendall(b"".join(frame(STATS, id=i) for i in range(1, sent + 1)))
        wait_for(lambda: any(f'"peer": "{peer}"' in line and "closing idle connection" in line
                             for line in idle_broker.log().splitlines()), timeout=10.0)
        received, reader = 0, FrameReader(1 << 28)
        sock.settimeout(10.0)
        try:
            while data := sock.recv(1 << 20):
                received += len(reader.feed(data))
        except ConnectionResetError:
            pass  # closed too, with a reset instead of a FIN
        assert received < sent, f"all {sent} replies arrived: the blocked send was not cut off"
    finally:
        sock.close()


# ---------------------------------------------------------------- authentication


SECRET_HASHED = "secret2"
AUTH_KEYS = f"secret1,sha256:{hashlib.sha256(SECRET_HASHED.encode()).hexdigest()}"


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = start_broker(tmp_path_factory, "auth", TQ_BROKER__HOST="0.0.0.0", TQ_AUTH__ENABLED="true",
                          TQ_AUTH__API_KEYS=AUTH_KEYS)
    yield broker
    broker.stop()


def test_with_auth_a_first_frame_other_than_hello_is_unauthorized_and_closed(
    auth_broker: BrokerProcess,
) -> None:
    raw = RawConn(auth_broker.port)
    try:
        raw.send(frame(STATS, id=3))
        kind, body = raw.recv_frame()
        assert (kind, body["code"]) == (0x7F, "UNAUTHORIZED")
        assert raw.wait_closed(timeout=3.0) is not None
    finally:
        raw.close()


HASH_AS_KEY = "sha256:" + hashlib.sha256(SECRET_HASHED.encode()).hexdigest()


@pytest.mark.parametrize("api_key", ["wrong", "", "secret1 ", HASH_AS_KEY],
                         ids=["wrong", "empty", "trailing-space", "the-hash-itself"])
def test_with_auth_a_wrong_key_is_unauthorized_and_closed(auth_broker: BrokerProcess, api_key: str) -> None:
    raw = RawConn(auth_broker.port)
    try:
        raw.send(frame(HELLO, id=4, client="raw", protocol=1, api_key=api_key) + frame(STATS, id=5))
        kind, body = raw.recv_frame()
        assert (kind, body["id"], body["code"]) == (0x7F, 4, "UNAUTHORIZED")
        assert raw.wait_closed(timeout=3.0) is not None
        assert not any(t == 0x49 for t, _ in raw.frames), "a request after the refused HELLO was served"
    finally:
        raw.close()
    with pytest.raises(Unauthorized):
        Client("127.0.0.1", auth_broker.port, api_key=api_key or None, timeout=5.0)


def test_with_auth_a_hello_without_a_key_is_unauthorized(auth_broker: BrokerProcess) -> None:
    raw = RawConn(auth_broker.port)
    try:
        raw.send(frame(HELLO, id=6, client="raw", protocol=1))
        kind, body = raw.recv_frame()
        assert (kind, body["code"]) == (0x7F, "UNAUTHORIZED")
        assert raw.wait_closed(timeout=3.0) is not None
    finally:
        raw.close()


@pytest.mark.parametrize("first", [
    HEADER.pack(4, 0x30) + b"\x80\x80\x80",  # an unknown type byte
    HEADER.pack(2, STATS) + b"\xc1",  # a payload that is not MessagePack
    frame(HELLO, id=8, client="raw"),  # a HELLO missing `protocol`
], ids=["unknown-type", "not-msgpack", "hello-missing-protocol"])
def test_with_auth_an_undecodable_first_frame_is_also_unauthorized_and_closed(
    auth_broker: BrokerProcess, first: bytes,
) -> None:
    raw = RawConn(auth_broker.port)
    try:
        raw.send(first + frame(STATS, id=9))
        kind, body = raw.recv_frame()
        assert kind == 0x7F
        assert body["code"] == "UNAUTHORIZED", f"first frame answered {body['code']}, not UNAUTHORIZED"
        assert raw.wait_closed(timeout=3.0) is not None
    finally:
        raw.close()


def test_with_auth_the_right_key_is_welcomed_and_requests_work(auth_broker: BrokerProcess) -> None:
    with Client("127.0.0.1", auth_broker.port, api_key="secret1", timeout=5.0) as c:
        assert c.welcome is not None and c.welcome.protocol == 1
        task_id = c.submit("auth.ok", queue="auth").task_id
        assert c.status(task_id).state == "pending"


def test_with_auth_a_key_listed_as_its_sha256_hex_is_accepted(auth_broker: BrokerProcess) -> None:
    with Client("127.0.0.1", auth_broker.port, api_key=SECRET_HASHED, timeout=5.0) as c:
        assert c.stats().connections >= 1


def test_with_auth_requests_pipelined_right_behind_the_hello_are_answered(auth_broker: BrokerProcess) -> None:
    raw = RawConn(auth_broker.port)
    try:
        raw.send(frame(HELLO, id=1, client="raw", protocol=1, api_key="secret1") + frame(STATS, id=2))
        assert [raw.recv_frame()[0], raw.recv_frame()[0]] == [0x41, 0x49]
    finally:
        raw.close()



@pytest.fixture(scope="module")
def remote_address() -> str:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    return address


def test_without_auth_a_connection_from_outside_loopback_is_refused_unauthorized(
    make_broker: Any, remote_address: str,
) -> None:
    broker = make_broker(TQ_BROKER__HOST="0.0.0.0")
    raw = RawConn(broker.port, host=remote_address)
    try:
        raw.send(frame(STATS, id=1))
        kind, body = raw.recv_frame()
        assert (kind, body["id"], body["code"]) == (0x7F, 0, "UNAUTHORIZED")
        assert raw.wait_closed(timeout=3.0) is not None
    finally:
        raw.close()
    with broker.client() as local:  # loopback is still served
        assert local.stats().connections >= 1


def test_allow_unauthenticated_remote_lets_outside_connections_in(
    make_broker: Any, remote_address: str,
) -> None:
    broker = make_broker(TQ_BROKER__HOST="0.0.0.0", TQ_AUTH__ALLOW_UNAUTHENTICATED_REMOTE="true")
    with Client(remote_address, broker.port, timeout=5.0) as c:
        assert c.stats().connections >= 1


def test_with_auth_a_remote_connection_with_the_right_key_is_served(
    auth_broker: BrokerProcess, remote_address: str,
) -> None:
    with Client(remote_address, auth_broker.port, api_key="secret1", timeout=5.0) as c:
        assert c.stats().connections >= 1
    with pytest.raises(Unauthorized):
        Client(remote_address, auth_broker.port, api_key="wrong", timeout=5.0)


# ---------------------------------------------------------------- durability


TASKINFO_EXACT = ("task_id", "queue", "kind", "priority", "state", "attempts", "max_retries", "worker_id",
                  "result", "error")
TASKINFO_TIMES = ("submitted_at", "run_at", "started_at", "finished_at")


def test_a_broker_killed_right_after_its_acknowledgements_loses_none_of_them(make_broker: Any) -> None:
    broker = make_broker(TQ_BROKER__RETRY_BACKOFF_BASE_MS="600000", TQ_BROKER__RETRY_BACKOFF_MAX_MS="600000")
    c = broker.client()
    ids: dict[str, str] = {}
    fifo = c.submit_batch([m.TaskSpec(kind=f"fifo-{i}", queue="d.fifo") for i in range(3)])
    ids["pending"] = c.submit("d", b"payload", queue="d.pending", priority=7, max_retries=5,
                              unique_key="uk").task_id
    ids["scheduled"] = c.submit("d", queue="d", run_at=time.time() + 3600).task_id
    for name in ("running", "completed", "failed", "retrying"):
        ids[name] = c.submit("d", queue="d." + name, lease_ms=600_000).task_id
        one(c.claim("dw", ["d." + name]))
    c.complete("dw", ids["completed"], b"result")
    c.fail("dw", ids["failed"], "fatal", retry=False)
    c.fail("dw", ids["retrying"], "transient")
    ids["cancelled"] = c.submit("d", queue="d").task_id
    c.cancel(ids["cancelled"])
    before = {name: c.status(task_id) for name, task_id in ids.items()}
    broker.kill()
    broker.restart()
    c = broker.client()
    for name, task_id in ids.items():
        after = c.status(task_id)
        for field in TASKINFO_EXACT:
            assert getattr(after, field) == getattr(before[name], field), (name, field)
        for field in TASKINFO_TIMES:
            was, now = getattr(before[name], field), getattr(after, field)
            assert (was is None) == (now is None), (name, field)
            assert was is None or abs(was - now) < 0.001, (name, field)
    duplicate = c.submit("d", queue="d.pending", unique_key="uk")  # the unique key survived too
    assert (duplicate.task_id, duplicate.duplicate) == (ids["pending"], True)
    assert [a.task_id for a in c.claim("dw2", ["d.fifo"], max_tasks=3)] == fifo
    resumed = one(c.claim("dw2", ["d.pending"]))
    assert (resumed.task_id, resumed.payload, resumed.attempt) == (ids["pending"], b"payload", 1)
    c.complete("dw", ids["running"], b"finished after the restart")  # its worker may finish it
    assert c.status(ids["running"]).state == "completed"
    with pytest.raises(NotLeased):
        c.complete("dw", ids["completed"])
    with pytest.raises(InvalidState):
        c.cancel(ids["completed"])


def test_a_finished_task_with_an_extreme_run_at_does_not_stop_task_history(make_broker: Any) -> None:
    broker = make_broker()
    c = broker.client()
    try:
        extreme = c.submit("d.extreme", queue="d.extreme", run_at=1e300).task_id
    except BadRequest:
        return  # refusing it is one way to conform
    c.cancel(extreme)
    normal = c.submit("d.normal", queue="d.normal").task_id
    one(c.claim("dw", ["d.normal"]))
    c.complete("dw", normal, b"r")
    sql = f"SELECT count(*) FROM task_history WHERE task_id = '{normal}'"
    deadline = time.monotonic() + 5.0
    while c.query(sql)[1] != [[1]]:
        assert time.monotonic() < deadline, "task_history stopped taking rows after a task with run_at=1e300"
        time.sleep(0.1)


@pytest.mark.parametrize("stop", ["kill", "sigterm"])
def test_a_finished_task_with_an_extreme_run_at_survives_a_broker_restart(
    make_broker: Any, stop: str,
) -> None:
    broker = make_broker()
    c = broker.client()
    try:
        extreme = c.submit("d.extreme", queue="d.extreme", run_at=1e300).task_id
    except BadRequest:
        return  # refusing it is one way to conform
    c.cancel(extreme)
    if stop == "kill":
        broker.kill()
    else:
        assert broker.terminate() == 0
    broker.restart()  # raises, with the broker's log, if it cannot start on this data dir
    assert broker.client().status(extreme).state == "cancelled"


def test_a_worker_holding_tasks_across_a_broker_restart_is_still_declared_dead_when_silent(
    make_broker: Any,
) -> None:
    broker = make_broker(**FAST_TIMERS)
    c = broker.client()
    c.register("restart-w")
    task_id = c.submit("d.held", queue="d.held", lease_ms=600_000).task_id
    one(c.claim("restart-w", ["d.held"]))
    broker.kill()
    broker.restart()
    c = broker.client()
    assert c.status(task_id).state == "running"
    # The worker never heartbeats again (it died while the broker was down).
    wait_for(lambda: c.status(task_id).state == "pending", timeout=4 * HEARTBEAT_S + 2.0, interval=0.1)


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_answers_a_waiting_claim_with_an_empty_assigned_and_exits_0_within_5_s(
    make_broker: Any,
) -> None:
    broker = make_broker()
    client = broker.client()
    pending = client.send_async(m.Claim(id=0, worker_id="term-w", queues=["term"], max_tasks=1,
                                        wait_ms=30_000))
    time.sleep(0.3)  # let the claim start waiting
    assert not pending.done()
    started = time.monotonic()
    exit_code: list[int] = []
    stopper = threading.Thread(target=lambda: exit_code.append(broker.terminate(timeout=15.0)))
    stopper.start()
    reply = pending.get(timeout=6.0)
    stopper.join(timeout=16.0)
    elapsed = time.monotonic() - started
    assert isinstance(reply, m.Assigned)
    assert reply.tasks == []
    assert exit_code == [0]
    assert elapsed <= 5.0, f"took {elapsed:.1f} s to exit"


# ---------------------------------------------------------------- start-up failures


def run_broker_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    base.update({"PYTHONPATH": str(ROOT), "TQ_PERSISTENCE__DATA_DIR": str(tmp_path / "data"),
                 "TQ_MONITORING__PROMETHEUS_PORT": "0",
                 "TQ_API__REST_PORT": "0", "TQ_BROKER__HOST": "127.0.0.1", **env})
    return subprocess.run([sys.executable, "-m", "actors"], cwd=ROOT, env=base, capture_output=True,
                          text=True, timeout=60)


def test_a_bad_config_value_exits_2_with_one_stderr_line_naming_the_key(tmp_path: Path) -> None:
    result = run_broker_process(tmp_path, TQ_BROKER__PORT="abc")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "broker.port" in lines[0]


def test_an_unknown_config_key_exits_2_naming_it(tmp_path: Path) -> None:
    result = run_broker_process(tmp_path, TQ_BROKER__NO_SUCH_KEY="1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "broker.no_such_key" in lines[0]


def test_a_port_already_in_use_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_broker_process(tmp_path, TQ_BROKER__PORT=str(port))
    assert result.returncode == 1
    plain = [line for line in result.stderr.splitlines() if line.strip() and not _is_json_log(line)]
    assert len(plain) == 1, result.stderr
    assert str(port) in plain[0] and "in use" in plain[0]


def _is_json_log(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
