"""Supervision and closed error paths: an essential actor's crash stops the broker (exit 70) without
leaving a half-dead broker that says ready and answers nothing, and loses no acknowledged change; a
failed fsync answers every waiting request INTERNAL and leaves the broker not ready until a restart.

Faults are injected with the test hooks (TQ_TEST_HOOKS=1 at broker start): a task of kind
`tq.test.crash` makes the queue actor's SUBMIT handler raise; the file FAIL_FSYNC in the WAL directory
makes every WAL fsync fail with EIO while it exists.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from actors.hub_actor import CRASH_KIND, ActorCrashed, HubActor, set_crash_listener
from storage.wal import FAIL_FSYNC_FLAG
from tests.helpers import wait_for
from transport.errors import BrokerError, InternalError, ShuttingDown
from transport.messages import Claim, Submit, SubmitBatch, TaskSpec


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:  # the broker has stopped serving: as good as 503 for a probe
        return 503, {}


# ------------------------------------------------------------------ an essential actor crashes


def test_a_crash_in_the_queue_actor_answers_everyone_exits_70_and_loses_no_acknowledged_task(make_broker) -> None:
    broker = make_broker(TQ_TEST_HOOKS="1")
    producer, worker = broker.client(timeout=10), broker.client(timeout=10)
    acknowledged = [producer.submit("job", b"%d" % n, queue="work").task_id for n in range(20)]
    waiting = worker.send_async(_claim("w1", "idle-queue", wait_ms=30_000))

    half = producer.send_async(SubmitBatch(id=0, tasks=[TaskSpec(kind="job", queue="work"),
                                                        TaskSpec(kind=CRASH_KIND, queue="work")]))
    with pytest.raises(InternalError, match="not applied"):
        half.get()  # the first task of the batch was applied in memory, never acknowledged
    with pytest.raises(ShuttingDown):
        waiting.get()  # the waiting long-poll CLAIM is answered, not left hanging

    assert broker.proc is not None
    assert broker.proc.wait(timeout=30) == 70
    log = broker.log()
    assert log.count('"level": "critical"') == 1 and "QueueActor crashed handling QueueRequests" in log, log
    assert "Unhandled exception" not in log and "snapshot of" not in log.split("crashed handling")[1], log

    broker.restart()
    client = broker.client()
    assert [client.status(task_id).state for task_id in acknowledged] == ["pending"] * 20
    assert client.stats().pending == 20  # the half-applied batch left nothing behind
    assert readyz(broker.metrics_port)[0] == 200


def test_requests_after_a_crash_get_an_error_or_a_closed_connection_never_silence(make_broker) -> None:
    broker = make_broker(TQ_TEST_HOOKS="1", TQ_BROKER__MAINTENANCE_INTERVAL_SECS="30")
    client = broker.client(timeout=10)
    with pytest.raises(InternalError):
        client.submit(CRASH_KIND, b"", queue="work")
    for _ in range(20):  # until the process is gone, each request is answered or the connection fails
        try:
            client.submit("job", b"", queue="work")
        except ShuttingDown:
            continue
        except (BrokerError, OSError, ConnectionError):
            break
        raise AssertionError("a crashed broker accepted a SUBMIT")
    assert broker.proc is not None and broker.proc.wait(timeout=30) == 70


def test_a_crash_in_the_worker_registry_stops_the_broker_too(make_broker) -> None:
    broker = make_broker(TQ_TEST_HOOKS="1")
    client = broker.client(timeout=10)
    with pytest.raises(InternalError, match="WorkerRegistryActor crashed handling RegistryRequest"):
        client.register("w1", name=CRASH_KIND)
    assert broker.proc is not None and broker.proc.wait(timeout=30) == 70
    assert '"level": "critical"' in broker.log()


def _claim(worker_id: str, queue: str, wait_ms: int) -> Claim:
    return Claim(id=0, worker_id=worker_id, queues=[queue], max_tasks=1, wait_ms=wait_ms)


# ------------------------------------------------------------------ a failed fsync


def test_a_failed_fsync_answers_every_waiting_request_internal_and_the_broker_stays_not_ready(make_broker) -> None:
    broker = make_broker(TQ_PERSISTENCE__FSYNC="always", TQ_TEST_HOOKS="1")
    client = broker.client(timeout=10)
    durable = client.submit("job", b"before", queue="q").task_id
    assert readyz(broker.metrics_port)[0] == 200

    flag = broker.data_dir / "wal" / FAIL_FSYNC_FLAG
    flag.touch()
    replies = client.pipeline([Submit(id=0, task=TaskSpec(kind="job", queue="q")) for _ in range(20)],
                              return_exceptions=True)
    assert all(isinstance(r, InternalError) for r in replies), replies
    assert "fsync of the WAL failed" in str(replies[0]) and "may not be durable" in str(replies[0])
    status, body = readyz(broker.metrics_port)
    assert status == 503 and "fsync" in body["error"] and "restart the broker" in body["error"]

    flag.unlink()  # the disk "works" again, but the page cache can no longer be trusted
    with pytest.raises(InternalError, match="fsync"):
        client.submit("job", b"after", queue="q")
    assert readyz(broker.metrics_port)[0] == 503
    assert client.status(durable).state == "pending"  # reads go on

    broker.restart()
    assert wait_for(lambda: readyz(broker.metrics_port)[0] == 200)
    assert broker.client().status(durable).state == "pending"


# ------------------------------------------------------------------ the policies, on real threads


class _Boom(HubActor):
    def on_receive(self, message: object) -> object:
        if message == "boom":
            raise ValueError("boom")
        return f"handled {message}"


class _Restarting(_Boom):
    crash_policy = "restart"


class _Essential(_Boom):
    crash_policy = "essential"


def test_a_stateless_actor_that_crashes_handles_the_next_message_as_usual() -> None:
    ref = _Restarting.start()
    try:
        with pytest.raises(ActorCrashed, match="_Restarting crashed handling str"):
            ref.ask("boom")
        ref.tell("boom")
        assert ref.ask("ping") == "handled ping"
    finally:
        ref.stop()


def test_an_ordinary_actor_that_crashes_stops_and_the_broker_is_not_told() -> None:
    heard: list[str] = []
    set_crash_listener(heard.append)
    try:
        ref = _Boom.start()
        ref.tell("boom")
        wait_for(lambda: not ref.is_alive())
        assert heard == []
    finally:
        set_crash_listener(None)


def test_an_essential_actor_that_crashes_tells_the_broker_once_and_refuses_every_later_ask() -> None:
    heard: list[str] = []
    set_crash_listener(heard.append)
    ref = _Essential.start()
    try:
        ref.tell("boom")
        with pytest.raises(ActorCrashed, match="_Essential crashed handling str: ValueError: boom"):
            ref.ask("ping")  # never handled by an actor whose state may be half-changed
        ref.tell("boom")
        assert heard == ["_Essential crashed handling str: ValueError: boom"]
        assert ref.is_alive()  # until the broker stops it
    finally:
        ref.stop()
        set_crash_listener(None)
