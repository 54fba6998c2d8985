"""Queue operations (protocol 1.1) against a real broker: pause/resume, the dead set with requeue and
delete, purge, the QUEUES listing, and that all of it survives kill -9 and a restart."""

from __future__ import annotations

import threading

import pytest
from conftest import BrokerProcess
from helpers import wait_for
from test_metrics_health import scrape, value

from actors.browse import BrowsableIndex, live_page
from actors.task_index import STALE_SLACK
from storage.model import (
    Counters,
    OpsState,
    QueueSettingsSet,
    TaskDied,
    TaskRecord,
    TasksRequeued,
    TaskSubmitted,
    apply_record,
)
from transport.errors import BadRequest, NotFound
from transport.messages import TaskSpec

W = "worker-1"


def fail_for_good(client, queue: str = "q", kind: str = "k", payload: bytes = b"p") -> str:  # type: ignore[no-untyped-def]
    """Submits a task with max_retries 0, claims it and reports a failure: it lands in the dead set."""
    task_id = client.submit(kind, payload, queue=queue, max_retries=0).task_id
    [job] = client.claim(W, [queue], max_tasks=1, wait_ms=1000)
    assert job.task_id == task_id
    client.fail(W, task_id, "boom")
    return task_id


# ------------------------------------------------------------------ pause / resume


def test_a_paused_queue_accepts_submits_but_hands_nothing_out_until_resumed(broker: BrokerProcess) -> None:
    c = broker.client()
    c.pause("q")
    task_id = c.submit("k", b"x", queue="q").task_id
    assert c.claim(W, ["q"], max_tasks=5, wait_ms=0) == []
    assert c.claim(W, ["q", "other"], max_tasks=5, wait_ms=200) == []  # a long poll waits it out, empty
    [info] = [q for q in c.queues() if q.name == "q"]
    assert info.paused and info.pending == 1
    c.resume("q")
    [job] = c.claim(W, ["q"], max_tasks=5, wait_ms=0)
    assert job.task_id == task_id


def test_stats_lists_paused_queues_and_leaves_the_key_out_while_none_is(broker: BrokerProcess) -> None:
    c = broker.client()
    assert c.stats().paused is None  # nothing paused: the v1 STATS reply, byte for byte
    c.pause("q")
    c.pause("a")
    assert c.stats().paused == ["a", "q"]
    c.resume("a")
    c.resume("q")
    assert c.stats().paused is None


def test_resume_wakes_a_claim_waiting_on_the_paused_queue(broker: BrokerProcess) -> None:
    c, admin = broker.client(), broker.client()
    c.pause("q")
    c.submit("k", b"x", queue="q")
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(c.claim(W, ["q"], max_tasks=1, wait_ms=20_000)))
    waiter.start()
    wait_for(lambda: broker.client().stats().queues["q"].pending == 1)
    assert waiter.is_alive()  # still waiting: the queue is paused
    admin.resume("q")
    waiter.join(timeout=10)
    assert not waiter.is_alive() and len(got[0]) == 1


def test_the_paused_gauge_follows_pause_and_resume(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(TQ_BROKER__MAINTENANCE_INTERVAL_SECS="0.2")
    c = broker.client()
    c.pause("media")
    wait_for(lambda: value(scrape(broker)[1], "tq_queue_paused", queue="media") == 1)
    c.resume("media")
    wait_for(lambda: value(scrape(broker)[1], "tq_queue_paused", queue="media") == 0)


# ------------------------------------------------------------------ dead set


def test_a_task_failed_for_good_is_dead_and_requeue_makes_it_claimable_under_the_same_id(
    broker: BrokerProcess,
) -> None:
    c = broker.client()
    task_id = fail_for_good(c, payload=b"the payload")
    status = c.status(task_id)
    assert status.state == "failed" and status.error == "boom"
    page = c.dead(queue="q")
    assert [t.task_id for t in page.tasks] == [task_id] and page.next is None
    assert c.requeue(task_id) == 1
    assert c.status(task_id).state == "pending" and c.dead().tasks == []
    [job] = c.claim(W, ["q"], max_tasks=1, wait_ms=1000)
    assert (job.task_id, job.payload, job.attempt) == (task_id, b"the payload", 1)
    c.complete(W, task_id, b"fixed")
    status = c.status(task_id)
    assert (status.state, status.result) == ("completed", b"fixed")


def test_requeueing_a_task_that_is_not_dead_is_not_found_and_requeue_needs_an_id_or_all(
    broker: BrokerProcess,
) -> None:
    c = broker.client()
    task_id = c.submit("k", b"", queue="q").task_id
    with pytest.raises(NotFound, match="not in the dead set"):
        c.requeue(task_id)
    with pytest.raises(BadRequest, match="task_id, or all"):
        c.requeue()


def test_requeue_all_and_delete_all_take_only_the_dead_tasks_matching_queue_and_kind(broker: BrokerProcess) -> None:
    c = broker.client()
    a = [fail_for_good(c, queue="qa", kind="x") for _ in range(3)]
    b = [fail_for_good(c, queue="qb", kind="x") for _ in range(2)]
    other = fail_for_good(c, queue="qa", kind="y")
    assert c.requeue(all=True, queue="qa", kind="x") == 3
    assert sorted(t.task_id for t in c.dead().tasks) == sorted([*b, other])
    assert {c.status(t).state for t in a} == {"pending"}
    assert c.delete_dead(all=True, queue="qb") == 2
    assert [t.task_id for t in c.dead().tasks] == [other]
    assert c.status(b[0]).state == "failed"  # deleted from the dead set, still answered from history
    with pytest.raises(NotFound):
        c.requeue(b[0])


def test_the_dead_set_pages_with_a_cursor_in_a_stable_order(broker: BrokerProcess) -> None:
    c = broker.client()
    ids = [fail_for_good(c) for _ in range(5)]
    first = c.dead(limit=2)
    second = c.dead(limit=2, after=first.next)
    third = c.dead(limit=2, after=second.next)
    assert [t.task_id for t in first.tasks + second.tasks + third.tasks] == ids and third.next is None
    newest = c.dead(limit=3, newest_first=True)
    assert [t.task_id for t in newest.tasks] == ids[::-1][:3]
    assert [t.task_id for t in c.dead(limit=3, after=newest.next, newest_first=True).tasks] == ids[::-1][3:]


def test_the_oldest_dead_tasks_fall_out_past_dead_set_max_and_are_counted(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(TQ_PERSISTENCE__DEAD_SET_MAX="2")
    c = broker.client()
    ids = [fail_for_good(c) for _ in range(3)]
    assert [t.task_id for t in c.dead().tasks] == ids[1:]
    assert value(scrape(broker)[1], "tq_dead_evicted_total") == 1
    assert "dead set: 1 oldest dead tasks dropped" in broker.log()


def test_with_dead_set_max_zero_a_failed_task_leaves_memory_as_before(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(TQ_PERSISTENCE__DEAD_SET_MAX="0")
    c = broker.client()
    task_id = fail_for_good(c)
    assert c.dead().tasks == [] and c.status(task_id).state == "failed"
    with pytest.raises(NotFound):
        c.requeue(task_id)


# ------------------------------------------------------------------ purge


def test_purge_cancels_pending_tasks_and_with_scheduled_also_the_scheduled_ones(broker: BrokerProcess) -> None:
    c = broker.client()
    c.submit_batch([TaskSpec(kind="k", queue="q") for _ in range(4)] + [TaskSpec(kind="k", queue="keep")])
    later = c.submit("k", b"", queue="q", run_at=4_000_000_000).task_id
    pending_id = c.submit("k", b"", queue="q").task_id
    assert c.purge("q") == 5
    assert c.status(pending_id).state == "cancelled" and c.status(later).state == "scheduled"
    assert c.purge("q", scheduled=True) == 1
    assert c.status(later).state == "cancelled"
    stats = c.stats()
    assert "q" not in stats.queues and stats.queues["keep"].pending == 1 and stats.cancelled_total == 6


# ------------------------------------------------------------------ durability


def test_pause_rate_limit_and_the_dead_set_survive_kill_9_and_a_restart(broker: BrokerProcess) -> None:
    c = broker.client()
    c.pause("paused-q")
    c.rate_limit("slow-q", 5)
    dead_id = fail_for_good(c)
    broker.kill()
    broker.restart()
    c = broker.client()
    infos = {q.name: q for q in c.queues()}
    assert infos["paused-q"].paused and infos["slow-q"].rate_limit == 5 and infos["q"].dead == 1
    assert c.status(dead_id).error == "boom"
    c.submit("k", b"", queue="paused-q")
    assert c.claim(W, ["paused-q"], max_tasks=1, wait_ms=0) == []
    assert c.requeue(dead_id) == 1


def test_queue_settings_and_the_dead_set_survive_a_snapshot_and_a_sigterm_restart(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS="0.2")
    c = broker.client()
    c.pause("paused-q")
    dead_id = fail_for_good(c)
    wait_for(lambda: broker.log().count("snapshot of") >= 2)  # a snapshot after the changes: older WAL gone
    assert broker.terminate() == 0
    broker.restart()
    c = broker.client()
    assert {q.name: q for q in c.queues()}["paused-q"].paused
    assert [t.task_id for t in c.dead().tasks] == [dead_id]


# ------------------------------------------------------------------ browse


def all_pages(c, state: str, limit: int, **kw) -> list[list[str]]:  # type: ignore[no-untyped-def]
    pages, cursor = [], None
    while True:
        page = c.browse(state, limit=limit, cursor=cursor, **kw)
        pages.append([t.task_id for t in page.tasks])
        if page.next is None:
            return pages
        cursor = page.next


def test_browsing_pending_pages_through_every_task_once_in_the_order_they_became_pending(
    broker: BrokerProcess,
) -> None:
    c = broker.client()
    ids = c.submit_batch([TaskSpec(kind="a" if i % 3 else "b", queue=f"q{i % 2}") for i in range(25)])
    c.claim(W, ["q0"], max_tasks=2, wait_ms=0)  # the first two of q0 (ids[0], ids[2]) are running now
    expected = [i for n, i in enumerate(ids) if n not in (0, 2)]
    pages = all_pages(c, "pending", limit=10)
    assert [len(p) for p in pages] == [10, 10, 3] and sum(pages, []) == expected
    assert sum(all_pages(c, "pending", limit=4, newest_first=True), []) == expected[::-1]
    assert sum(all_pages(c, "pending", limit=5, queue="q1"), []) == ids[1::2]
    assert sum(all_pages(c, "pending", limit=5, queue="q1", kind="b"), []) == [i for n, i in enumerate(ids)
                                                                              if n % 2 == 1 and n % 3 == 0]
    assert sorted(t.task_id for t in c.browse("running").tasks) == sorted([ids[0], ids[2]])


def test_browsing_scheduled_and_finished_tasks_reads_memory_and_then_history(broker: BrokerProcess) -> None:
    c = broker.client()
    later = [c.submit("k", b"", queue="q", run_at=4_000_000_000 + i).task_id for i in range(3)]
    assert [t.task_id for t in c.browse("scheduled", queue="q").tasks] == later
    done = []
    for _ in range(5):
        task_id = c.submit("k", b"", queue="q").task_id
        c.claim(W, ["q"], max_tasks=1, wait_ms=0)
        c.complete(W, task_id, b"ok")
        done.append(task_id)
    wait_for(lambda: c.query("SELECT count(*) FROM task_history")[1][0][0] == 5)
    assert sum(all_pages(c, "completed", limit=2, queue="q"), []) == done
    assert sum(all_pages(c, "completed", limit=3, newest_first=True), []) == done[::-1]
    assert c.browse("cancelled").tasks == []


def test_a_cursor_the_broker_did_not_give_is_a_bad_request(broker: BrokerProcess) -> None:
    c = broker.client()
    with pytest.raises(BadRequest, match="cursor"):
        c.browse("pending", cursor="x:1")
    with pytest.raises(BadRequest, match="cursor"):
        c.browse("completed", cursor="h:nope:1")


# ------------------------------------------------------------------ the browse log, on its own


def pending_task(i: int, queue: str = "q") -> TaskRecord:
    return TaskRecord(task_id=f"t{i}", queue=queue, kind="k", payload=b"", priority=150, state="pending", attempts=0,
                      max_retries=0, lease_ms=1000, submitted_at=0.0, run_at=0.0, ready_seq=i)


def test_a_drained_queue_keeps_no_more_than_the_slack_of_stale_browse_entries() -> None:
    index = BrowsableIndex()
    tasks = [pending_task(i) for i in range(1, 5001)]
    for task in tasks:
        index.enter(task)
    for task in index.claim_order(["q"], 5000):
        index.leave(task)
        task.state = "running"
    assert len(index.logs[("q", "pending")].keys) <= STALE_SLACK + 1
    assert live_page(index, {}, "pending", "q", None, 100, None, False) == ([], None)


def test_a_live_page_skips_tasks_that_moved_on_and_resumes_after_its_cursor() -> None:
    index = BrowsableIndex()
    tasks = [pending_task(i, queue=f"q{i % 2}") for i in range(1, 11)]
    for task in tasks:
        index.enter(task)
    index.leave(tasks[2])
    tasks[2].state = "running"  # t3 left pending
    page, cursor = live_page(index, {}, "pending", None, None, 4, None, False)
    assert [t.task_id for t in page] == ["t1", "t2", "t4", "t5"] and cursor == 5
    page, cursor = live_page(index, {}, "pending", None, None, 4, cursor, False)
    assert [t.task_id for t in page] == ["t6", "t7", "t8", "t9"]
    assert [t.task_id for t in live_page(index, {}, "pending", None, None, 4, cursor, False)[0]] == ["t10"]


# ------------------------------------------------------------------ the records, replayed


def test_each_queue_operation_record_replayed_twice_changes_nothing_more_than_once() -> None:
    def replay(times: int) -> tuple[dict[str, TaskRecord], Counters, OpsState]:
        tasks, counters, ops = {}, Counters(), OpsState()
        records = [TaskSubmitted(task=pending_task(1)),
                   TaskDied(task_id="t1", attempts=1, finished_at=5.0, worker_id="w", error="boom"),
                   QueueSettingsSet(queue="q", paused=True, rate_limit=3.0),
                   TasksRequeued(task_ids=["t1"], first_seq=7, at=6.0)]
        for record in records:
            for _ in range(times):
                apply_record(record, tasks, counters, ops)
        return tasks, counters, ops

    once, twice = replay(1), replay(2)
    assert once[0]["t1"].state == "pending" and once[0]["t1"].ready_seq == 7 and once[1].failed_total == 1
    assert once == twice
