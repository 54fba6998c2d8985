"""Queue operations over HTTP against a real broker: the REST routes change what TCP clients see."""

from __future__ import annotations

import time
from typing import Any

import pytest

from actors.http.app import gated
from actors.queries import QueryGate
from tests.helpers import wait_for
from tests.rest_helpers import Http, rest_broker

KEY, READER = "ops-write-key", "ops-read-key"


@pytest.fixture
def rest(make_broker):  # type: ignore[no-untyped-def]
    broker, port = rest_broker(make_broker)
    client = Http(port)
    yield broker, client
    client.close()


def _dead_task(client: Any, queue: str = "media", kind: str = "resize") -> str:
    task_id = client.submit(kind, b"x", queue=queue, max_retries=0).task_id
    [job] = client.claim("w1", [queue], max_tasks=1, wait_ms=0)
    client.fail("w1", job.task_id, error="boom")
    return task_id


def test_a_paused_queue_gives_a_tcp_claim_nothing_until_it_is_resumed_over_http(rest) -> None:
    broker, http = rest
    tcp = broker.client()
    task_id = tcp.submit("k", b"x", queue="media").task_id
    assert http.call("POST", "/api/v1/queues/media/pause") == (200, {"ok": True})
    assert tcp.claim("w1", ["media"], max_tasks=1, wait_ms=0) == []
    _, queues = http.call("GET", "/api/v1/queues")
    assert queues["queues"]["media"]["paused"] is True and queues["queues"]["media"]["pending"] == 1
    assert http.call("POST", "/api/v1/queues/media/resume") == (200, {"ok": True})
    [job] = tcp.claim("w1", ["media"], max_tasks=1, wait_ms=0)
    assert job.task_id == task_id


def test_a_task_that_died_at_once_is_listed_as_dead_and_requeued_claimable_under_the_same_id(rest) -> None:
    broker, http = rest
    tcp = broker.client()
    task_id = _dead_task(tcp)
    status, dead = http.call("GET", "/api/v1/dead?queue=media")
    assert status == 200 and [t["task_id"] for t in dead["tasks"]] == [task_id] and dead["next"] is None
    assert dead["tasks"][0]["state"] == "failed" and dead["tasks"][0]["error"] == "boom"
    _, queues = http.call("GET", "/api/v1/queues")
    assert queues["queues"]["media"]["dead"] == 1
    assert http.call("POST", "/api/v1/dead/requeue", {"task_id": task_id}) == (200, {"count": 1})
    assert tcp.status(task_id).state == "pending"
    [job] = tcp.claim("w2", ["media"], max_tasks=1, wait_ms=0)
    assert job.task_id == task_id


def test_requeue_all_and_delete_all_count_the_dead_tasks_of_a_queue_they_change(rest) -> None:
    broker, http = rest
    tcp = broker.client()
    for _ in range(3):
        _dead_task(tcp, queue="mail")
    other = _dead_task(tcp, queue="media")
    assert http.call("POST", "/api/v1/dead/delete", {"all": True, "queue": "mail"}) == (200, {"count": 3})
    _, dead = http.call("GET", "/api/v1/dead")
    assert [t["task_id"] for t in dead["tasks"]] == [other]
    assert http.call("POST", "/api/v1/dead/requeue", {"all": True}) == (200, {"count": 1})
    status, body = http.call("POST", "/api/v1/dead/requeue", {"task_id": other, "all": True})
    assert status == 400 and "not both" in body["error"]["message"]


def test_purge_answers_the_count_and_spares_scheduled_tasks_unless_asked(rest) -> None:
    broker, http = rest
    tcp = broker.client()
    for _ in range(4):
        tcp.submit("k", b"", queue="bulk")
    tcp.submit("k", b"", queue="bulk", run_at=time.time() + 3600)
    assert http.call("POST", "/api/v1/queues/bulk/purge") == (200, {"count": 4})  # the body is optional
    assert http.call("POST", "/api/v1/queues/bulk/purge", {"scheduled": True}) == (200, {"count": 1})
    assert tcp.stats().pending == 0 and tcp.stats().scheduled == 0


def test_a_rate_limit_set_and_cleared_shows_in_get_queues(rest) -> None:
    broker, http = rest
    broker.client().submit("k", b"", queue="api")
    assert http.call("PUT", "/api/v1/queues/api/rate-limit", {"per_second": 2.5})[0] == 200
    assert http.call("GET", "/api/v1/queues")[1]["queues"]["api"]["rate_limit"] == 2.5
    assert [q.rate_limit for q in broker.client().queues() if q.name == "api"] == [2.5]
    assert http.call("PUT", "/api/v1/queues/api/rate-limit", {"per_second": None})[0] == 200
    assert http.call("GET", "/api/v1/queues")[1]["queues"]["api"]["rate_limit"] is None
    status, body = http.call("PUT", "/api/v1/queues/api/rate-limit", {"per_second": 0})
    assert status == 400 and "per_second" in body["error"]["message"]


def test_a_schedule_is_put_listed_deleted_and_visible_to_tcp_clients(rest) -> None:
    broker, http = rest
    spec = {"cron": "*/5 * * * *", "tz": "Europe/Berlin", "task": {"kind": "report.build", "queue": "reports",
                                                                   "payload": {"month": 11}}}
    assert http.call("PUT", "/api/v1/schedules/nightly", spec) == (200, {"name": "nightly", "ok": True})
    _, listed = http.call("GET", "/api/v1/schedules")
    [sched] = listed["schedules"]
    assert (sched["name"], sched["cron"], sched["tz"], sched["kind"], sched["queue"], sched["enabled"]) == (
        "nightly", "*/5 * * * *", "Europe/Berlin", "report.build", "reports", True)
    assert [s.name for s in broker.client().schedules()] == ["nightly"]
    status, body = http.call("PUT", "/api/v1/schedules/bad", {**spec, "cron": "not a cron"})
    assert status == 400, body
    assert http.call("DELETE", "/api/v1/schedules/nightly") == (200, {"name": "nightly", "ok": True})
    assert http.call("GET", "/api/v1/schedules") == (200, {"schedules": []})
    assert http.call("DELETE", "/api/v1/schedules/nightly")[0] == 404


def _pages(http: Http, query: str) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        status, page = http.call("GET", f"/api/v1/tasks?{query}" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, page
        pages.append([t["task_id"] for t in page["tasks"]])
        cursor = page["next"]
        if cursor is None:
            return pages


def test_browsing_pending_and_completed_tasks_pages_with_the_cursor(rest) -> None:
    broker, http = rest
    tcp = broker.client()
    pending = [tcp.submit("k", b"", queue="browse").task_id for _ in range(5)]
    tcp.submit("other", b"", queue="elsewhere")
    assert [t for page in _pages(http, "state=pending&queue=browse&limit=2") for t in page] == pending
    assert len(_pages(http, "state=pending&queue=browse&limit=2")[0]) == 2
    done = []
    for _ in range(3):
        [job] = tcp.claim("w1", ["browse"], max_tasks=1, wait_ms=0)
        tcp.complete("w1", job.task_id)
        done.append(job.task_id)
    wait_for(lambda: tcp.query("SELECT count(*) FROM task_history WHERE state = 'completed'")[1][0][0] == 3)
    pages = _pages(http, "state=completed&queue=browse&limit=2")
    assert [len(p) for p in pages[:2]] == [2, 1] and sorted(t for p in pages for t in p) == sorted(done)
    newest = _pages(http, "state=completed&limit=3&order=newest")[0]
    assert newest == list(reversed([t for p in pages for t in p]))
    status, body = http.call("GET", "/api/v1/tasks?state=completed&cursor=nonsense")
    assert status == 400 and "cursor" in body["error"]["message"]
    status, body = http.call("GET", "/api/v1/tasks?queue=browse")
    assert status == 400 and "state is required" in body["error"]["message"]
    status, body = http.call("GET", "/api/v1/tasks?state=pending&limit=5000")
    assert status == 400 and "limit" in body["error"]["message"]


def test_a_read_only_key_reads_every_operation_but_each_change_is_403(make_broker) -> None:
    broker, port = rest_broker(make_broker, TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS=KEY,
                               TQ_AUTH__READ_ONLY_API_KEYS=READER)
    reader = Http(port, key=READER)
    for path in ("/api/v1/queues", "/api/v1/dead", "/api/v1/schedules", "/api/v1/tasks?state=pending",
                 "/api/v1/tasks?state=failed"):
        assert reader.call("GET", path)[0] == 200, path
    changes = [("POST", "/api/v1/queues/q/pause", None), ("POST", "/api/v1/queues/q/resume", None),
               ("POST", "/api/v1/queues/q/purge", {}), ("PUT", "/api/v1/queues/q/rate-limit", {"per_second": 1}),
               ("POST", "/api/v1/dead/requeue", {"all": True}), ("POST", "/api/v1/dead/delete", {"all": True}),
               ("PUT", "/api/v1/schedules/s", {"cron": "* * * * *", "task": {"kind": "k"}}),
               ("DELETE", "/api/v1/schedules/s", None)]
    for method, path, body in changes:
        status, answer = reader.call(method, path, body)
        assert status == 403 and answer["error"]["code"] == "FORBIDDEN", (method, path)
    assert not any(q.paused for q in broker.client(api_key=KEY).queues())
    reader.close()


def test_a_bad_queue_name_in_the_path_is_refused_naming_the_field(rest) -> None:
    _, http = rest
    status, body = http.call("POST", "/api/v1/queues/" + "x" * 300 + "/pause")
    assert status == 400 and "queue" in body["error"]["message"]


class _Ctx:
    def __init__(self) -> None:
        self.queries = QueryGate(1)


def test_every_http_query_holds_a_slot_of_the_broker_wide_query_gate_while_it_runs() -> None:
    ctx = _Ctx()
    seen: list[int] = []

    def query(sql: str) -> str:
        seen.append(sum(ctx.queries.running.values()))
        return sql

    run = gated(ctx, query)  # type: ignore[arg-type]
    assert run("SELECT 1") == "SELECT 1" and run("SELECT 2") == "SELECT 2"
    assert seen == [1, 1] and ctx.queries.running == {}
