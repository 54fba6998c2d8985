"""The dashboard's queue-operation pages and forms over real HTTP against a real broker: each form changes
what TCP clients see, and lists come a page at a time."""

from __future__ import annotations

import html
import re
from urllib.parse import urlencode

import pytest

from tests.helpers import wait_for
from tests.rest_helpers import Http, rest_broker

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def dash(make_broker):  # type: ignore[no-untyped-def]
    broker, port = rest_broker(make_broker)
    http = Http(port)
    yield broker, http, {"Origin": f"http://127.0.0.1:{port}", **FORM}
    http.close()


def _post(http: Http, path: str, origin: dict[str, str], **fields: str) -> str:
    """POSTs a form; returns where the 303 sends the browser."""
    status, _ = http.call("POST", path, raw=urlencode(fields).encode(), headers=origin)
    assert status == 303, (path, status)
    return http.last_headers["location"]


def _dead(client, queue: str = "media") -> str:  # type: ignore[no-untyped-def]
    task_id = client.submit("resize", b"x", queue=queue, max_retries=0).task_id
    [job] = client.claim("w1", [queue], max_tasks=1, wait_ms=0)
    client.fail("w1", job.task_id, error="disk full")
    return task_id


def test_the_queue_forms_pause_resume_rate_limit_and_purge(dash) -> None:
    broker, http, origin = dash
    tcp = broker.client()
    for _ in range(3):
        tcp.submit("k", b"", queue="media")
    _post(http, "/queues/media/pause", origin)
    assert [q.paused for q in tcp.queues() if q.name == "media"] == [True]
    assert tcp.claim("w1", ["media"], max_tasks=1, wait_ms=0) == []
    page = http.call("GET", "/queues")[1]
    assert 'id="resume-media"' in page and 'id="state-media" class="failed">paused<' in page
    _post(http, "/queues/media/resume", origin)
    assert [q.paused for q in tcp.queues() if q.name == "media"] == [False]
    _post(http, "/queues/media/rate-limit", origin, per_second="4")
    assert [q.rate_limit for q in tcp.queues() if q.name == "media"] == [4.0]
    where = _post(http, "/queues/media/rate-limit", origin, per_second="fast")
    assert "error=" in where and "not%20a%20number" in where
    _post(http, "/queues/media/rate-limit", origin, per_second="")
    assert [q.rate_limit for q in tcp.queues() if q.name == "media"] == [None]
    _post(http, "/queues/media/purge", origin)
    assert tcp.stats().pending == 0


def test_the_dead_set_page_lists_and_requeues_one_and_deletes_the_rest(dash) -> None:
    broker, http, origin = dash
    tcp = broker.client()
    first, second, third = _dead(tcp), _dead(tcp), _dead(tcp, queue="mail")
    page = http.call("GET", "/dead")[1]
    assert all(f'id="dead-{t}"' in page for t in (first, second, third)) and "disk full" in page
    assert f'id="dead-{third}"' not in http.call("GET", "/dead?queue=media")[1]
    assert _post(http, "/dead/requeue", origin, task_id=first, back="//evil.example/x").endswith("/dead")
    assert tcp.status(first).state == "pending"
    _post(http, "/dead/delete", origin, all="on", queue="media")
    assert [t.task_id for t in tcp.dead().tasks] == [third]
    _post(http, "/dead/requeue", origin, all="on")
    assert tcp.status(third).state == "pending"
    assert "the dead set is empty" in http.call("GET", "/dead")[1]


def test_a_dead_tasks_page_has_a_requeue_button_that_makes_it_pending(dash) -> None:
    broker, http, origin = dash
    task_id = _dead(broker.client())
    page = http.call("GET", f"/tasks/{task_id}")[1]
    assert 'id="requeue"' in page
    assert _post(http, f"/tasks/{task_id}/requeue", origin).endswith(f"/tasks/{task_id}")
    assert broker.client().status(task_id).state == "pending"
    assert 'id="requeue"' not in http.call("GET", f"/tasks/{task_id}")[1]
    where = _post(http, f"/tasks/{task_id}/requeue", origin)
    assert "error=" in where


def test_the_tasks_page_lists_one_state_a_page_at_a_time_by_cursor(dash) -> None:
    broker, http, _ = dash
    tcp = broker.client()
    ids = [tcp.submit("k", b"", queue="bulk").task_id for _ in range(60)]
    page = http.call("GET", "/tasks?state=pending&queue=bulk")[1]
    assert sum(t in page for t in ids) == 50 and ids[0] in page and ids[50] not in page
    next_link = html.unescape(re.search(r'id="next" href="([^"]+)"', page).group(1))
    rest = http.call("GET", next_link)[1]
    assert sum(t in rest for t in ids) == 10 and ids[59] in rest and 'id="next"' not in rest
    [job] = tcp.claim("w1", ["bulk"], max_tasks=1, wait_ms=0)
    assert job.task_id in http.call("GET", "/tasks?state=running")[1]
    tcp.complete("w1", job.task_id)
    wait_for(lambda: job.task_id in http.call("GET", "/tasks?state=completed&queue=bulk")[1])
    status, page = http.call("GET", "/tasks?state=pending&cursor=garbage")
    assert status == 400 and 'class="error"' in page


def test_the_schedules_page_adds_lists_and_deletes_a_schedule(dash) -> None:
    broker, http, origin = dash
    _post(http, "/schedules/add", origin, name="nightly", cron="0 3 * * *", tz="Europe/Berlin", kind="report.build",
          queue="reports", priority="low", payload='{"month": 11}', enabled="on")
    [sched] = broker.client().schedules()
    assert (sched.name, sched.cron, sched.tz, sched.kind, sched.queue, sched.enabled) == (
        "nightly", "0 3 * * *", "Europe/Berlin", "report.build", "reports", True)
    assert 'id="schedule-nightly"' in http.call("GET", "/schedules")[1]
    where = _post(http, "/schedules/add", origin, name="broken", cron="every day", kind="k")
    assert "error=" in where and len(broker.client().schedules()) == 1
    assert "error=" in _post(http, "/schedules/add", origin, name="bad-json", cron="* * * * *", kind="k",
                             payload="{not json")
    _post(http, "/schedules/nightly/delete", origin)
    assert broker.client().schedules() == []
