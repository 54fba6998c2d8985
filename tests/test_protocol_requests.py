"""Protocol conformance, part 2: every request type and every response field, through the Python client.

Written from docs/protocol.md ("Types", "TaskSpec", "Assignment", "TaskInfo", "Stats", "WorkerInfo", "Task
states"). One broker serves the whole module; every test works in queues and worker ids of its own, so
tests never see each other's tasks.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import BrokerProcess
from helpers import wait_for

from transport import messages as m
from transport.client import Client
from transport.errors import BadRequest, InvalidState, NotFound, NotLeased

MAX_BATCH_CLAIM = 4
HEARTBEAT_INTERVAL_S = 60  # long: no worker of this module is declared dead while it runs
DEFAULT_LEASE_S = 30  # broker.worker_lease_timeout_secs default
DEFAULT_MAX_RETRIES = 3  # broker.default_max_retries default
BACKOFF_BASE_MS = 1000  # broker.retry_backoff_base_ms default
PRIORITY = {"high": 255, "normal": 150, "low": 50}


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path_factory.mktemp("requests") / "data", {
        "TQ_BROKER__MAX_BATCH_CLAIM": str(MAX_BATCH_CLAIM),
        "TQ_WORKER__HEARTBEAT_INTERVAL_SECS": str(HEARTBEAT_INTERVAL_S),
    }).start()
    yield broker
    broker.stop()


@pytest.fixture
def client(shared_broker: BrokerProcess) -> Iterator[Client]:
    c = Client("127.0.0.1", shared_broker.port, timeout=10.0)
    yield c
    c.close()


@pytest.fixture
def queue() -> str:
    return f"rq-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def worker() -> str:
    return f"rw-{uuid.uuid4().hex[:12]}"


def spec(kind: str = "req.test", **fields: Any) -> m.TaskSpec:
    return m.TaskSpec(kind=kind, **fields)




def claim_one(client: Client, worker: str, queue: str, **kwargs: Any) -> m.Assignment:
    tasks = client.claim(worker, [queue], **kwargs)
    assert len(tasks) == 1, tasks
    return tasks[0]


# ---------------------------------------------------------------- HELLO


def test_hello_is_answered_welcome_with_protocol_1_and_the_broker_limits(client: Client) -> None:
    welcome = client.welcome
    assert isinstance(welcome, m.Welcome)
    assert welcome.protocol == 1
    assert isinstance(welcome.server, str) and welcome.server
    assert welcome.heartbeat_interval_ms == HEARTBEAT_INTERVAL_S * 1000
    assert welcome.max_batch_claim == MAX_BATCH_CLAIM


def test_a_second_hello_on_the_same_connection_is_answered_welcome_again(client: Client) -> None:
    reply = client.request(m.Hello(id=0, client="again", protocol=1))
    assert isinstance(reply, m.Welcome)
    assert reply.protocol == 1


# ---------------------------------------------------------------- SUBMIT


def test_submit_without_optional_fields_uses_the_documented_defaults(client: Client) -> None:
    before = time.time()
    submitted = client.request(m.Submit(id=0, task=m.TaskSpec(kind="req.defaults")))
    after = time.time()
    assert isinstance(submitted, m.Submitted)
    assert submitted.duplicate is False
    assert isinstance(submitted.task_id, str) and submitted.task_id
    info = client.status(submitted.task_id)
    try:
        assert info.task_id == submitted.task_id
        assert info.queue == "default"
        assert info.kind == "req.defaults"
        assert info.priority == 150
        assert info.state == "pending"
        assert info.attempts == 0
        assert info.max_retries == DEFAULT_MAX_RETRIES
        assert before - 1 <= info.submitted_at <= after + 1
        assert before - 1 <= info.run_at <= after + 1
    finally:
        client.cancel(submitted.task_id)


@pytest.mark.parametrize(("name", "value"), sorted(PRIORITY.items()))
def test_a_named_priority_tier_maps_to_its_documented_number(client: Client, queue: str, name: str,
                                                              value: int) -> None:
    task_id = client.submit("req.tier", queue=queue, priority=name).task_id
    assert client.status(task_id).priority == value


@pytest.mark.parametrize("value", [0, 1, 99, 100, 199, 200, 254, 255])
def test_a_numeric_priority_is_kept_as_given(client: Client, queue: str, value: int) -> None:
    task_id = client.submit("req.numeric", queue=queue, priority=value).task_id
    assert client.status(task_id).priority == value


def test_payload_is_returned_byte_for_byte_in_the_assignment(client: Client, queue: str, worker: str) -> None:
    payload = bytes(range(256)) * 4
    client.submit("req.payload", payload, queue=queue)
    assert claim_one(client, worker, queue).payload == payload


def test_a_run_at_in_the_future_makes_the_task_scheduled_with_that_run_at(client: Client, queue: str) -> None:
    run_at = time.time() + 3600
    task_id = client.submit("req.later", queue=queue, run_at=run_at).task_id
    info = client.status(task_id)
    assert info.state == "scheduled"
    assert math.isclose(info.run_at, run_at, abs_tol=0.001)


def test_a_run_at_in_the_past_makes_the_task_pending(client: Client, queue: str) -> None:
    task_id = client.submit("req.past", queue=queue, run_at=time.time() - 60).task_id
    assert client.status(task_id).state == "pending"


def test_payload_defaults_to_empty(client: Client, queue: str, worker: str) -> None:
    client.request(m.Submit(id=0, task=m.TaskSpec(kind="req.empty", queue=queue)))
    assert claim_one(client, worker, queue).payload == b""


@pytest.mark.parametrize("char", ["k", "\u00e9", "\u65e5"])
def test_kind_and_queue_of_exactly_200_characters_are_accepted(
    client: Client, char: str, worker: str,
) -> None:
    kind = char * 200
    queue = f"rq200-{uuid.uuid4().hex}".ljust(200, "x")
    task_id = client.submit(kind, queue=queue).task_id
    info = client.status(task_id)
    assert (info.kind, info.queue) == (kind, queue)
    assert claim_one(client, worker, queue).kind == kind


@pytest.mark.parametrize("queue_name", ["a", "A-z_0.9:x", "tenant:eu.jobs-1_b"])
def test_queue_names_from_the_whole_documented_alphabet_are_accepted(client: Client, queue_name: str,
                                                                     worker: str) -> None:
    queue = f"{queue_name}-{uuid.uuid4().hex[:8]}"
    task_id = client.submit("req.alphabet", queue=queue).task_id
    assert claim_one(client, worker, queue).task_id == task_id


@pytest.mark.parametrize("run_at", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_run_at_that_is_not_a_finite_time_is_refused_naming_run_at(client: Client, queue: str,
                                                                      run_at: float) -> None:
    with pytest.raises(BadRequest, match="run_at"):
        client.submit("req.when", queue=queue, run_at=run_at)
    assert queue not in client.stats().queues


@pytest.mark.parametrize("max_retries", [0, 7, 100])
def test_max_retries_is_kept_as_given(client: Client, queue: str, max_retries: int) -> None:
    task_id = client.submit("req.retries", queue=queue, max_retries=max_retries).task_id
    assert client.status(task_id).max_retries == max_retries


@pytest.mark.parametrize("lease_ms", [100, 5000, 86_400_000])
def test_lease_ms_within_bounds_sets_the_lease_of_the_claim(client: Client, queue: str, worker: str,
                                                            lease_ms: int) -> None:
    client.submit("req.lease", queue=queue, lease_ms=lease_ms)
    before = time.time()
    assignment = claim_one(client, worker, queue)
    after = time.time()
    assert before + lease_ms / 1000 - 0.5 <= assignment.lease_expires_at <= after + lease_ms / 1000 + 0.5


@pytest.mark.parametrize("lease_ms", [0, 99, 86_400_001])
def test_lease_ms_outside_100_to_86400000_is_refused_naming_lease_ms(client: Client, queue: str,
                                                                     lease_ms: int) -> None:
    with pytest.raises(BadRequest, match="lease_ms"):
        client.submit("req.lease", queue=queue, lease_ms=lease_ms)


def test_without_lease_ms_the_lease_is_worker_lease_timeout_secs(
    client: Client, queue: str, worker: str,
) -> None:
    client.submit("req.lease", queue=queue)
    before = time.time()
    assignment = claim_one(client, worker, queue)
    after = time.time()
    assert before + DEFAULT_LEASE_S - 0.5 <= assignment.lease_expires_at <= after + DEFAULT_LEASE_S + 0.5


def test_a_repeated_unique_key_returns_the_same_task_as_a_duplicate_and_adds_nothing(
    client: Client, queue: str,
) -> None:
    first = client.submit("req.unique", queue=queue, unique_key="order-1")
    second = client.submit("req.unique", b"other", queue=queue, unique_key="order-1")
    assert first.duplicate is False
    assert second.duplicate is True
    assert second.task_id == first.task_id
    assert client.stats().queues[queue].pending == 1


def test_the_same_unique_key_in_another_queue_makes_a_new_task(client: Client, queue: str) -> None:
    first = client.submit("req.unique", queue=queue, unique_key="k")
    other = client.submit("req.unique", queue=queue + "-other", unique_key="k")
    assert other.duplicate is False
    assert other.task_id != first.task_id


def test_a_unique_key_is_free_again_once_its_task_is_terminal(
    client: Client, queue: str, worker: str,
) -> None:
    first = client.submit("req.unique", queue=queue, unique_key="again")
    running = claim_one(client, worker, queue)
    assert client.submit("req.unique", queue=queue, unique_key="again").duplicate is True  # running: live
    client.complete(worker, running.task_id)
    again = client.submit("req.unique", queue=queue, unique_key="again")
    assert again.duplicate is False
    assert again.task_id != first.task_id
    client.cancel(again.task_id)
    assert client.submit("req.unique", queue=queue, unique_key="again").duplicate is False


def test_a_unique_key_on_a_scheduled_task_makes_later_submits_duplicates(client: Client, queue: str) -> None:
    first = client.submit("req.unique", queue=queue, unique_key="later", run_at=time.time() + 3600)
    second = client.submit("req.unique", queue=queue, unique_key="later")
    assert (second.task_id, second.duplicate) == (first.task_id, True)


# ---------------------------------------------------------------- SUBMIT_BATCH


def test_submit_batch_returns_one_id_per_task_in_the_same_order(client: Client, queue: str) -> None:
    kinds = [f"req.batch.{i}" for i in range(25)]
    reply = client.request(m.SubmitBatch(id=0, tasks=[spec(kind, queue=queue) for kind in kinds]))
    assert isinstance(reply, m.SubmittedBatch)
    assert len(reply.task_ids) == len(kinds)
    assert len(set(reply.task_ids)) == len(kinds)
    assert [client.status(task_id).kind for task_id in reply.task_ids] == kinds


def test_submit_batch_tasks_become_pending_in_batch_order(client: Client, queue: str, worker: str) -> None:
    ids = client.submit_batch([spec(queue=queue) for _ in range(MAX_BATCH_CLAIM)])
    assert [a.task_id for a in client.claim(worker, [queue], max_tasks=MAX_BATCH_CLAIM)] == ids


def test_submit_batch_with_a_repeated_unique_key_adds_one_task(client: Client, queue: str) -> None:
    ids = client.submit_batch([spec(queue=queue, unique_key="same"), spec(queue=queue, unique_key="same"),
                               spec(queue=queue, unique_key="other")])
    assert ids[0] == ids[1] != ids[2]
    assert client.stats().queues[queue].pending == 2


def test_submit_batch_of_zero_tasks_is_refused(client: Client) -> None:
    with pytest.raises(BadRequest, match="tasks"):
        client.submit_batch([])


def test_submit_batch_of_10001_tasks_is_refused_and_adds_nothing(client: Client, queue: str) -> None:
    with pytest.raises(BadRequest, match="tasks"):
        client.submit_batch([spec(queue=queue) for _ in range(10_001)])
    assert queue not in client.stats().queues


def test_submit_batch_of_10000_tasks_is_accepted(client: Client, queue: str) -> None:
    ids = client.submit_batch([spec(queue=queue) for _ in range(10_000)])
    assert len(ids) == 10_000
    assert client.stats().queues[queue].pending == 10_000


def test_submit_batch_with_one_bad_spec_is_refused_whole(client: Client, queue: str) -> None:
    with pytest.raises(BadRequest, match="priority"):
        client.request(m.SubmitBatch(id=0, tasks=[spec(queue=queue), spec(queue=queue, priority=999)]))
    assert queue not in client.stats().queues


# ---------------------------------------------------------------- CLAIM


def test_claim_returns_the_highest_priority_task_first_across_the_named_queues_then_fifo(
    client: Client, queue: str, worker: str,
) -> None:
    q1, q2 = queue + "-a", queue + "-b"
    low = client.submit("low", queue=q1, priority="low").task_id
    normal_1 = client.submit("n1", queue=q1, priority="normal").task_id
    high = client.submit("high", queue=q2, priority="high").task_id
    normal_2 = client.submit("n2", queue=q2, priority="normal").task_id
    normal_3 = client.submit("n3", queue=q1, priority=150).task_id
    top = client.submit("top-numeric", queue=q1, priority=201).task_id
    order = [a.task_id for a in client.claim(worker, [q1, q2], max_tasks=MAX_BATCH_CLAIM)]
    order += [a.task_id for a in client.claim(worker, [q2, q1], max_tasks=MAX_BATCH_CLAIM)]
    assert order == [high, top, normal_1, normal_2, normal_3, low]


def test_claim_takes_only_from_the_queues_it_names(client: Client, queue: str, worker: str) -> None:
    client.submit("elsewhere", queue=queue + "-other", priority="high")
    mine = client.submit("mine", queue=queue, priority="low").task_id
    assert [a.task_id for a in client.claim(worker, [queue], max_tasks=MAX_BATCH_CLAIM)] == [mine]


@pytest.mark.parametrize(("asked", "expected"), [
    (1, 1), (3, 3), (MAX_BATCH_CLAIM, MAX_BATCH_CLAIM), (MAX_BATCH_CLAIM + 1, MAX_BATCH_CLAIM),
    (10_000, MAX_BATCH_CLAIM), (0, 1), (-5, 1),
])
def test_max_tasks_is_clamped_to_1_through_max_batch_claim(client: Client, queue: str, worker: str,
                                                           asked: int, expected: int) -> None:
    client.submit_batch([spec(queue=queue) for _ in range(MAX_BATCH_CLAIM + 2)])
    assert len(client.claim(worker, [queue], max_tasks=asked)) == expected


@pytest.mark.parametrize("wait_ms", [0, -1000])
def test_claim_with_wait_ms_0_or_less_returns_an_empty_assigned_at_once(
    client: Client, queue: str, worker: str, wait_ms: int,
) -> None:
    started = time.monotonic()
    reply = client.request(m.Claim(id=0, worker_id=worker, queues=[queue], max_tasks=1, wait_ms=wait_ms))
    assert isinstance(reply, m.Assigned)
    assert reply.tasks == []
    assert time.monotonic() - started < 0.5


def test_an_assignment_carries_every_field_and_attempt_1_on_the_first_run(client: Client, queue: str,
                                                                          worker: str) -> None:
    task_id = client.submit("req.assign", b"\x00\x01payload", queue=queue, priority=42,
                            lease_ms=20_000).task_id
    before = time.time()
    a = claim_one(client, worker, queue)
    assert a.task_id == task_id
    assert a.queue == queue
    assert a.kind == "req.assign"
    assert a.payload == b"\x00\x01payload"
    assert a.priority == 42
    assert a.attempt == 1
    assert isinstance(a.lease_expires_at, float)
    assert before + 19 <= a.lease_expires_at <= time.time() + 21


def test_a_claimed_task_is_not_handed_out_twice(client: Client, queue: str, worker: str) -> None:
    client.submit("req.once", queue=queue)
    claim_one(client, worker, queue)
    assert client.claim(worker + "-2", [queue]) == []


# ---------------------------------------------------------------- RESULT


def test_result_ok_completes_the_task_and_keeps_its_result(client: Client, queue: str, worker: str) -> None:
    task_id = client.submit("req.ok", queue=queue).task_id
    claim_one(client, worker, queue)
    reply = client.request(m.Result(id=0, worker_id=worker, task_id=task_id, ok=True, result=b"\x00answer"))
    assert isinstance(reply, m.Ok)
    info = client.status(task_id)
    assert info.state == "completed"
    assert info.result == b"\x00answer"
    assert info.attempts == 1
    assert info.finished_at is not None


def test_result_not_ok_with_retries_left_schedules_a_retry_after_backoff(client: Client, queue: str,
                                                                          worker: str) -> None:
    task_id = client.submit("req.fail", queue=queue, max_retries=2).task_id
    claim_one(client, worker, queue)
    sent = time.time()
    client.fail(worker, task_id, "boom")
    info = client.status(task_id)
    assert info.state == "scheduled"
    assert info.error == "boom"
    assert info.attempts == 1
    delay = BACKOFF_BASE_MS / 1000
    assert sent + 0.8 * delay - 0.05 <= info.run_at <= time.time() + 1.2 * delay + 0.05


def test_result_not_ok_with_retry_false_fails_the_task_at_once(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("req.fatal", queue=queue, max_retries=5).task_id
    claim_one(client, worker, queue)
    client.fail(worker, task_id, "fatal", retry=False)
    info = client.status(task_id)
    assert info.state == "failed"
    assert info.error == "fatal"
    assert info.finished_at is not None


def test_result_not_ok_without_retries_left_fails_the_task(client: Client, queue: str, worker: str) -> None:
    task_id = client.submit("req.noretry", queue=queue, max_retries=0).task_id
    claim_one(client, worker, queue)
    client.fail(worker, task_id, "once only")
    assert client.status(task_id).state == "failed"


def test_result_from_a_worker_that_does_not_hold_the_task_is_not_leased_and_changes_nothing(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("req.other", queue=queue).task_id
    claim_one(client, worker, queue)
    with pytest.raises(NotLeased):
        client.complete(worker + "-intruder", task_id)
    with pytest.raises(NotLeased):
        client.fail(worker + "-intruder", task_id, "not mine", retry=False)
    info = client.status(task_id)
    assert (info.state, info.worker_id) == ("running", worker)
    client.complete(worker, task_id)


def test_result_for_a_finished_task_is_not_leased(client: Client, queue: str, worker: str) -> None:
    task_id = client.submit("req.twice", queue=queue).task_id
    claim_one(client, worker, queue)
    client.complete(worker, task_id, b"first")
    with pytest.raises(NotLeased):
        client.complete(worker, task_id, b"second")
    with pytest.raises(NotLeased):
        client.fail(worker, task_id, "late")
    info = client.status(task_id)
    assert (info.state, info.result) == ("completed", b"first")


def test_result_for_a_pending_task_is_not_leased(client: Client, queue: str, worker: str) -> None:
    task_id = client.submit("req.pending", queue=queue).task_id
    with pytest.raises(NotLeased):
        client.complete(worker, task_id)
    assert client.status(task_id).state == "pending"


def test_result_for_an_unknown_task_is_not_found(client: Client, worker: str) -> None:
    with pytest.raises(NotFound):
        client.complete(worker, "no-such-task-" + uuid.uuid4().hex)


# ---------------------------------------------------------------- HEARTBEAT


def test_heartbeat_is_answered_ok_and_records_cpu_and_memory(client: Client, worker: str) -> None:
    client.register(worker)
    reply = client.request(m.Heartbeat(id=0, worker_id=worker, active=[], cpu_percent=12.5,
                                       memory_bytes=4096))
    assert isinstance(reply, m.Ok)
    info = next(w for w in client.workers() if w.worker_id == worker)
    assert info.cpu_percent == 12.5
    assert info.memory_bytes == 4096
    assert info.alive is True


def test_a_heartbeat_moves_last_heartbeat_forward(client: Client, worker: str) -> None:
    client.register(worker)
    registered_at = next(w for w in client.workers() if w.worker_id == worker).last_heartbeat
    time.sleep(0.02)  # lets the clock move
    client.heartbeat(worker, [])
    beat_at = next(w for w in client.workers() if w.worker_id == worker).last_heartbeat
    assert registered_at < beat_at <= time.time() + 1


def test_heartbeat_naming_tasks_the_worker_does_not_hold_is_still_ok_and_changes_nothing(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("req.hb", queue=queue).task_id
    client.heartbeat(worker, [task_id, "no-such-task"])
    assert client.status(task_id).state == "pending"


# ---------------------------------------------------------------- STATUS


def test_status_of_a_pending_task_has_no_run_fields(client: Client, queue: str) -> None:
    task_id = client.submit("req.st", queue=queue, priority="high", max_retries=4).task_id
    info = client.status(task_id)
    assert (info.task_id, info.queue, info.kind, info.priority, info.state) == (task_id, queue, "req.st", 255,
                                                                               "pending")
    assert (info.attempts, info.max_retries) == (0, 4)
    assert isinstance(info.submitted_at, float) and isinstance(info.run_at, float)
    assert info.started_at is None and info.finished_at is None
    assert info.worker_id is None and info.result is None and info.error is None


def test_status_of_a_running_task_has_its_worker_and_start_time(
    client: Client, queue: str, worker: str,
) -> None:
    task_id = client.submit("req.st", queue=queue).task_id
    before = time.time()
    claim_one(client, worker, queue)
    info = client.status(task_id)
    assert info.state == "running"
    assert info.worker_id == worker
    assert info.attempts == 1
    assert info.started_at is not None and before - 1 <= info.started_at <= time.time() + 1
    assert info.finished_at is None


def test_status_of_a_completed_task_has_its_finish_time_and_result(client: Client, queue: str,
                                                                    worker: str) -> None:
    task_id = client.submit("req.st", queue=queue).task_id
    claim_one(client, worker, queue)
    client.complete(worker, task_id, b"done")
    info = client.status(task_id)
    assert info.state == "completed"
    assert info.result == b"done"
    assert info.finished_at is not None and info.started_at is not None
    assert info.finished_at >= info.started_at >= info.submitted_at - 0.001


def test_status_of_a_failed_task_has_its_error(client: Client, queue: str, worker: str) -> None:
    task_id = client.submit("req.st", queue=queue).task_id
    claim_one(client, worker, queue)
    client.fail(worker, task_id, "it broke", retry=False)
    info = client.status(task_id)
    assert (info.state, info.error, info.attempts) == ("failed", "it broke", 1)
    assert info.finished_at is not None


def test_status_of_a_cancelled_task_says_cancelled(client: Client, queue: str) -> None:
    task_id = client.submit("req.st", queue=queue).task_id
    client.cancel(task_id)
    info = client.status(task_id)
    assert info.state == "cancelled"
    assert info.finished_at is not None


def test_status_of_an_unknown_task_is_not_found(client: Client) -> None:
    with pytest.raises(NotFound):
        client.status("no-such-task-" + uuid.uuid4().hex)


# ---------------------------------------------------------------- CANCEL


def test_cancel_of_a_pending_task_makes_it_cancelled_and_unclaimable(client: Client, queue: str,
                                                                       worker: str) -> None:
    task_id = client.submit("req.cancel", queue=queue).task_id
    reply = client.request(m.Cancel(id=0, task_id=task_id))
    assert isinstance(reply, m.Ok)
    assert client.status(task_id).state == "cancelled"
    assert client.claim(worker, [queue]) == []


def test_cancel_of_a_scheduled_task_makes_it_cancelled(client: Client, queue: str) -> None:
    task_id = client.submit("req.cancel", queue=queue, run_at=time.time() + 3600).task_id
    client.cancel(task_id)
    assert client.status(task_id).state == "cancelled"


def test_cancel_of_a_running_task_is_invalid_state_and_changes_nothing(client: Client, queue: str,
                                                                        worker: str) -> None:
    task_id = client.submit("req.cancel", queue=queue).task_id
    claim_one(client, worker, queue)
    with pytest.raises(InvalidState):
        client.cancel(task_id)
    assert client.status(task_id).state == "running"
    client.complete(worker, task_id)


def test_cancel_of_a_completed_task_is_invalid_state(client: Client, queue: str, worker: str) -> None:
    task_id = client.submit("req.cancel", queue=queue).task_id
    claim_one(client, worker, queue)
    client.complete(worker, task_id)
    with pytest.raises(InvalidState):
        client.cancel(task_id)
    assert client.status(task_id).state == "completed"


def test_cancel_of_a_cancelled_task_is_invalid_state(client: Client, queue: str) -> None:
    task_id = client.submit("req.cancel", queue=queue).task_id
    client.cancel(task_id)
    with pytest.raises(InvalidState):
        client.cancel(task_id)


def test_cancel_of_an_unknown_task_is_not_found(client: Client) -> None:
    with pytest.raises(NotFound):
        client.cancel("no-such-task-" + uuid.uuid4().hex)


# ---------------------------------------------------------------- STATS


STATS_COUNTS = ("pending", "scheduled", "running", "completed_total", "failed_total", "cancelled_total",
                "submitted_total", "workers_alive", "connections")


def test_stats_has_every_field_and_every_count_is_an_int(client: Client) -> None:
    reply = client.request(m.Stats(id=0))
    assert isinstance(reply, m.StatsReply)
    stats = reply.stats
    for name in STATS_COUNTS:
        value = getattr(stats, name)
        assert type(value) is int, (name, value)
        assert value >= 0
    assert isinstance(stats.uptime_s, float) and stats.uptime_s > 0
    assert stats.connections >= 1
    for name, q in stats.queues.items():
        for field in ("pending", "scheduled", "running", "high", "normal", "low"):
            assert type(getattr(q, field)) is int, (name, field)


def test_stats_counts_one_queue_by_state_and_pending_by_tier(client: Client, queue: str, worker: str) -> None:
    claimed = client.submit("first", queue=queue, priority=255).task_id
    client.submit("h", queue=queue, priority=230)
    client.submit("n", queue=queue, priority="normal")
    client.submit("l1", queue=queue, priority=0)
    client.submit("l2", queue=queue, priority="low")
    client.submit("s", queue=queue, run_at=time.time() + 3600)
    assert claim_one(client, worker, queue).task_id == claimed
    q = client.stats().queues[queue]
    assert (q.pending, q.scheduled, q.running) == (4, 1, 1)
    assert (q.high, q.normal, q.low) == (1, 1, 2)


def test_stats_totals_follow_submits_completions_failures_and_cancels(client: Client, queue: str,
                                                                       worker: str) -> None:
    before = client.stats()
    ids = client.submit_batch([spec(queue=queue, max_retries=0) for _ in range(4)])
    client.submit("extra", queue=queue, run_at=time.time() + 3600)
    done, failed = (a.task_id for a in client.claim(worker, [queue], max_tasks=2))
    client.complete(worker, done)
    client.fail(worker, failed, "x")
    client.cancel(ids[2])
    after = client.stats()
    assert after.submitted_total - before.submitted_total == 5
    assert after.completed_total - before.completed_total == 1
    assert after.failed_total - before.failed_total == 1
    assert after.cancelled_total - before.cancelled_total == 1
    q = after.queues[queue]
    assert (q.pending, q.scheduled, q.running) == (1, 1, 0)


def test_stats_pending_scheduled_and_running_are_totals_over_all_queues(client: Client, queue: str,
                                                                        worker: str) -> None:
    stats = client.stats()
    assert stats.pending == sum(q.pending for q in stats.queues.values())
    assert stats.scheduled == sum(q.scheduled for q in stats.queues.values())
    assert stats.running == sum(q.running for q in stats.queues.values())


def test_stats_counts_connections_and_live_workers(shared_broker: BrokerProcess, client: Client,
                                                   worker: str) -> None:
    # Only this test's connections are open now; a closed one may take a moment to be counted out.
    wait_for(lambda: client.stats().connections == 1)
    extra = shared_broker.client()
    try:
        wait_for(lambda: client.stats().connections == 2)
        before = client.stats().workers_alive
        client.register(worker)
        assert client.stats().workers_alive == before + 1
    finally:
        extra.close()
    wait_for(lambda: client.stats().connections == 1)


# ---------------------------------------------------------------- REGISTER, WORKERS, DEREGISTER


def test_register_with_a_worker_id_keeps_it_and_workers_lists_every_field(
    client: Client, worker: str,
) -> None:
    before = time.time()
    reply = client.request(m.Register(id=0, worker_id=worker, name="render-1", hostname="host-a", pid=4321,
                                      queues=["images", "video"], concurrency=8,
                                      metadata={"region": "eu", "gpu": "none"}))
    assert isinstance(reply, m.Registered)
    assert reply.worker_id == worker
    reply = client.request(m.Workers(id=0))
    assert isinstance(reply, m.WorkerList)
    info = next(w for w in reply.workers if w.worker_id == worker)
    assert info.name == "render-1"
    assert info.hostname == "host-a"
    assert info.pid == 4321
    assert info.queues == ["images", "video"]
    assert info.concurrency == 8
    assert info.metadata == {"region": "eu", "gpu": "none"}
    assert info.alive is True
    assert before - 1 <= info.last_heartbeat <= time.time() + 1  # registration time until a heartbeat
    assert type(info.cpu_percent) is float
    assert type(info.memory_bytes) is int
    assert info.running == []


def test_register_without_a_worker_id_gets_a_fresh_one_from_the_broker(client: Client) -> None:
    first = client.register(name="anon")
    second = client.register(name="anon")
    assert isinstance(first, str) and first
    assert first != second
    ids = {w.worker_id for w in client.workers()}
    assert {first, second} <= ids


def test_register_with_no_fields_at_all_is_accepted(client: Client) -> None:
    reply = client.request(m.Register(id=0))
    assert isinstance(reply, m.Registered) and reply.worker_id


def test_workers_lists_the_ids_of_the_tasks_a_worker_holds(client: Client, queue: str, worker: str) -> None:
    client.register(worker)
    client.submit_batch([spec(queue=queue) for _ in range(3)])
    held = {a.task_id for a in client.claim(worker, [queue], max_tasks=3)}
    info = next(w for w in client.workers() if w.worker_id == worker)
    assert set(info.running) == held
    client.complete(worker, held.pop())
    info = next(w for w in client.workers() if w.worker_id == worker)
    assert set(info.running) == held


def test_deregister_is_answered_ok(client: Client, worker: str) -> None:
    client.register(worker)
    reply = client.request(m.Deregister(id=0, worker_id=worker))
    assert isinstance(reply, m.Ok)


def test_deregister_returns_held_tasks_to_pending_at_once_with_the_run_uncounted(
    client: Client, queue: str, worker: str,
) -> None:
    client.register(worker)
    ids = client.submit_batch([spec(queue=queue) for _ in range(2)])
    client.claim(worker, [queue], max_tasks=2)
    client.deregister(worker)
    for task_id in ids:
        info = client.status(task_id)
        assert (info.state, info.attempts) == ("pending", 0)
    assert [a.attempt for a in client.claim(worker + "-next", [queue], max_tasks=2)] == [1, 1]


# ---------------------------------------------------------------- QUERY


def history_count(client: Client) -> int:
    columns, rows = client.query("SELECT count(*) FROM task_history")
    assert len(columns) == 1 and len(rows) == 1 and len(rows[0]) == 1
    assert type(rows[0][0]) is int
    return rows[0][0]


def test_query_counts_task_history_once_tasks_reach_a_terminal_state(client: Client, queue: str,
                                                                     worker: str) -> None:
    before = history_count(client)
    client.submit_batch([spec(queue=queue) for _ in range(3)])
    for a in client.claim(worker, [queue], max_tasks=3):
        client.complete(worker, a.task_id)
    wait_for(lambda: history_count(client) >= before + 3, timeout=10.0, interval=0.1)


def test_query_answers_rows_with_column_names(client: Client) -> None:
    reply = client.request(m.Query(id=0, sql="SELECT 1 AS one, 'two' AS two"))
    assert isinstance(reply, m.Rows)
    assert reply.columns == ["one", "two"]
    assert reply.rows == [[1, "two"]]


@pytest.mark.parametrize("sql", [
    "DELETE FROM task_history",
    "INSERT INTO task_history SELECT * FROM task_history",
    "DROP TABLE task_history",
    "UPDATE task_history SET state = 'x'",
    "CREATE TABLE evil AS SELECT 1",
    "SELECT 1; DROP TABLE task_history",
])
def test_query_refuses_anything_but_one_read_with_bad_request(client: Client, sql: str) -> None:
    before = history_count(client)
    with pytest.raises(BadRequest):
        client.query(sql)
    assert history_count(client) >= before


def test_query_with_invalid_sql_is_bad_request(client: Client) -> None:
    with pytest.raises(BadRequest):
        client.query("SELEC nonsense FROM")


def test_query_accepts_a_with_clause_and_a_trailing_semicolon(client: Client) -> None:
    assert client.query("WITH x AS (SELECT 41 + 1 AS n) SELECT n FROM x;")[1] == [[42]]


def test_query_has_one_history_row_per_terminal_task(client: Client, queue: str, worker: str) -> None:
    retried = client.submit("req.hist", queue=queue, max_retries=2).task_id
    cancelled = client.submit("req.hist", queue=queue, run_at=time.time() + 3600).task_id
    client.cancel(cancelled)
    claim_one(client, worker, queue)
    client.fail(worker, retried, "again")  # scheduled retry, 1 s away: not terminal yet
    client.request(m.Cancel(id=0, task_id=retried))  # a scheduled retry may be cancelled
    sql = f"SELECT task_id, state FROM task_history WHERE queue = '{queue}' ORDER BY state"
    rows = wait_for(lambda: len(r := client.query(sql)[1]) >= 2 and r, timeout=10.0, interval=0.1)
    assert sorted(map(tuple, rows)) == sorted([(retried, "cancelled"), (cancelled, "cancelled")])


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "COPY (SELECT 1) TO '/tmp/tq-conformance-copy.csv'",
    "ATTACH ':memory:' AS other",
    "SET threads = 1",
    "PRAGMA version",
])
def test_query_cannot_reach_files_or_change_settings(client: Client, sql: str) -> None:
    with pytest.raises(BadRequest):
        client.query(sql)
