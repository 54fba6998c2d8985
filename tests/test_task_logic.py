"""Unit tests of the pure parts of the queue: claim order, timers, state transitions, backoff."""

from __future__ import annotations

import random

from actors import task_states as states
from actors.task_index import STALE_SLACK, TaskIndex
from storage.model import Counters, TaskState, apply_record
from transport.messages import TaskSpec


def submit(index: TaskIndex, seq: int, priority: int | str = "normal", queue: str = "default",
           run_at: float | None = None, now: float = 1000.0) -> str:
    spec = TaskSpec(kind="k", queue=queue, priority=priority, run_at=run_at)
    record = states.new_task(spec, f"t{seq}", now, seq, default_max_retries=3, default_lease_ms=30_000)
    apply_record(record, index.tasks, Counters())
    index.enter(record.task)
    return record.task.task_id


def claim_ids(index: TaskIndex, queues: list[str], limit: int) -> list[str]:
    out = []
    for task in index.claim_order(queues, limit):
        index.leave(task)
        apply_record(states.claim(task, "w", 1000.0), index.tasks, Counters())
        index.enter(task)
        out.append(task.task_id)
    return out


def test_claim_order_is_highest_priority_first_then_fifo():
    index = TaskIndex()
    submit(index, 1, "low")
    submit(index, 2, "normal")
    submit(index, 3, "high")
    submit(index, 4, "normal")
    submit(index, 5, 255)
    assert claim_ids(index, ["default"], 10) == ["t3", "t5", "t2", "t4", "t1"]


def test_claim_order_spans_the_named_queues_only():
    index = TaskIndex()
    submit(index, 1, 10, queue="a")
    submit(index, 2, 200, queue="b")
    submit(index, 3, 100, queue="c")
    submit(index, 4, 10, queue="a")
    assert claim_ids(index, ["a", "c"], 10) == ["t3", "t1", "t4"]
    assert index.pending_total == 1


def test_cancelled_task_is_skipped_by_claims_and_counts_stay_right():
    index = TaskIndex()
    submit(index, 1)
    submit(index, 2)
    task = index.tasks["t1"]
    index.leave(task)
    apply_record(states.cancel(task, 1001.0), index.tasks, Counters())
    index.forget(task)
    assert claim_ids(index, ["default"], 5) == ["t2"]
    assert index.pending_total == 0
    assert index.running_total == 1
    assert index.queue_stats()["default"].running == 1


def test_scheduled_tasks_become_due_in_run_at_order():
    index = TaskIndex()
    submit(index, 1, run_at=1010.0)
    submit(index, 2, run_at=1005.0)
    submit(index, 3, run_at=2000.0)
    assert index.scheduled_total == 3
    assert [t.task_id for t in index.due_scheduled(1009.0)] == ["t2"]
    assert [t.task_id for t in index.due_scheduled(1500.0)] == ["t1"]


def test_expired_leases_ignore_renewed_ones():
    index = TaskIndex()
    submit(index, 1)
    submit(index, 2)
    claim_ids(index, ["default"], 2)
    renewed = index.tasks["t2"]
    renewed.lease_expires_at = 5000.0
    index.push_lease(renewed)
    assert [t.task_id for t in index.expired_leases(1100.0)] == ["t1"]
    assert index.expired_leases(4000.0) == []
    assert index.by_worker["w"] == {"t1", "t2"}


def test_a_failed_run_is_retried_while_attempts_do_not_exceed_max_retries():
    index = TaskIndex()
    submit(index, 1)
    task = index.tasks["t1"]
    counters = Counters()
    for attempt in range(1, 5):
        index.leave(task)
        apply_record(states.claim(task, "w", 1000.0), index.tasks, counters)
        index.enter(task)
        assert task.attempts == attempt
        record = states.fail(task, "boom", True, 1000.0, base_ms=100, max_ms=1000)
        index.leave(task)
        apply_record(record, index.tasks, counters)
        if attempt <= 3:
            assert task.state == TaskState.SCHEDULED and task.run_at > 1000.0
            task.state = TaskState.PENDING  # as the promotion would do
        else:
            assert task.state == TaskState.FAILED and "t1" not in index.tasks
    assert counters.failed_total == 1 and counters.retried_total == 3


def test_retry_false_fails_at_once():
    index = TaskIndex()
    submit(index, 1)
    task = index.tasks["t1"]
    apply_record(states.claim(task, "w", 1000.0), index.tasks, Counters())
    assert isinstance(states.fail(task, "no", False, 1000.0, 100, 1000), states.TaskFinished)


def test_deregister_gives_the_attempt_back():
    index = TaskIndex()
    submit(index, 1)
    task = index.tasks["t1"]
    apply_record(states.claim(task, "w", 1000.0), index.tasks, Counters())
    apply_record(states.returned(task, 9), index.tasks, Counters())
    assert (task.state, task.attempts, task.worker_id, task.ready_seq) == (TaskState.PENDING, 0, None, 9)


def test_backoff_doubles_up_to_the_maximum_with_twenty_percent_jitter():
    rng = random.Random(7)
    for attempts, expected in [(1, 100), (2, 200), (3, 400), (10, 1000)]:
        for _ in range(50):
            delay = states.retry_delay_ms(attempts, 100, 1000, rng)
            assert expected * 0.8 <= delay <= expected * 1.2


def test_task_ids_are_unique():
    ids = states.TaskIds()
    other = states.TaskIds()
    generated = {ids.next() for _ in range(10_000)} | {other.next() for _ in range(10_000)}
    assert len(generated) == 20_000


def finish(index: TaskIndex, task_id: str, how: str = "complete") -> None:
    task = index.tasks[task_id]
    index.leave(task)
    record = states.complete(task, b"r", 1001.0) if how == "complete" else states.cancel(task, 1001.0)
    apply_record(record, index.tasks, Counters())
    index.forget(task)


def test_finished_tasks_do_not_stay_in_the_lease_heap_until_their_lease_would_expire():
    index = TaskIndex()
    for seq in range(20_000):
        submit(index, seq)
        claim_ids(index, ["default"], 1)
        finish(index, f"t{seq}")
    assert index.running_total == 0 and not index.tasks
    assert index.heap_entries() <= 2 * STALE_SLACK + 1  # not 20,000 finished tasks held by stale entries


def test_a_lease_still_expires_after_its_heap_was_rebuilt():
    index = TaskIndex()
    submit(index, 0)
    claim_ids(index, ["default"], 1)  # lease expires at 1000 + 30 s
    for seq in range(1, 5_000):
        submit(index, seq)
        claim_ids(index, ["default"], 1)
        finish(index, f"t{seq}")
    assert [t.task_id for t in index.expired_leases(1031.0)] == ["t0"]


def test_cancelled_scheduled_tasks_do_not_pile_up_until_their_run_at():
    index = TaskIndex()
    for seq in range(10_000):
        submit(index, seq, run_at=10_000_000.0)  # far in the future
        finish(index, f"t{seq}", how="cancel")
    submit(index, 10_000, run_at=1_500.0)
    assert index.heap_entries() <= 2 * STALE_SLACK + 2
    assert [t.task_id for t in index.due_scheduled(2_000.0)] == ["t10000"]
