"""The dashboard's pages and forms over real HTTP against a real broker (no browser: see
tests/test_dashboard_browser.py for the pages in Chromium)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from tests.helpers import wait_for
from tests.rest_helpers import Http, rest_broker

KEY, READER = "dash-write-key", "dash-read-key"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def dash(make_broker):  # type: ignore[no-untyped-def]
    broker, port = rest_broker(make_broker)
    return broker, port, Http(port)


def test_every_page_renders_with_the_brokers_figures(dash) -> None:
    broker, port, http = dash
    client = broker.client()
    client.submit("resize", b"1", queue="media", priority="high")
    done = client.submit("thumb", b"2", queue="media").task_id
    [job] = client.claim("w1", ["media"], max_tasks=1, wait_ms=0)
    assert job.task_id != done
    client.cancel(done)
    for path, expected in (("/", 'id="stat-running">1<'), ("/queues", 'id="queue-media"'), ("/running", job.task_id),
                           ("/workers", "w1"), ("/tasks?state=cancelled", done), (f"/tasks/{job.task_id}", "running"),
                           ("/sql", "task_history"), ("/login", "api_key")):
        status, page = wait_for(lambda p=path, e=expected: (r := http.call("GET", p))[1].count(e) and r)
        assert status == 200, path


def test_the_cancel_button_cancels_and_a_cross_site_post_does_not(dash) -> None:
    broker, port, http = dash
    task_id = broker.client().submit("k", b"x").task_id
    status, body = http.call("POST", f"/tasks/{task_id}/cancel", raw=b"", headers={"Origin": "http://evil.example"})
    assert status == 403
    status, _ = http.call("POST", f"/tasks/{task_id}/cancel", raw=b"")  # no Origin, no Referer: refused too
    assert status == 403
    assert broker.client().status(task_id).state == "pending"
    status, _ = http.call("POST", f"/tasks/{task_id}/cancel", raw=b"",
                          headers={"Referer": f"http://127.0.0.1:{port}/tasks/{task_id}"})
    assert status == 303 and http.last_headers["location"].endswith(f"/tasks/{task_id}")
    assert broker.client().status(task_id).state == "cancelled"


def test_the_sql_page_shows_a_table_and_downloads_csv(dash) -> None:
    broker, port, http = dash
    task_id = broker.client().submit("k", b"x").task_id
    broker.client().cancel(task_id)
    origin = {"Origin": f"http://127.0.0.1:{port}", **FORM}
    form = urlencode({"sql": "SELECT task_id, state FROM task_history"}).encode()
    page = wait_for(lambda: (r := http.call("POST", "/sql", raw=form, headers=origin)[1]).count(task_id) and r)
    assert '<table id="result">' in page and "cancelled" in page
    csv_form = urlencode({"sql": "SELECT task_id, state FROM task_history", "format": "csv"}).encode()
    status, text = http.call("POST", "/sql", raw=csv_form, headers=origin)
    assert status == 200 and text.splitlines() == ["task_id,state", f"{task_id},cancelled"]
    assert http.last_headers["content-disposition"] == 'attachment; filename="query.csv"'
    status, page = http.call("POST", "/sql", raw=urlencode({"sql": "DROP TABLE task_history"}).encode(),
                             headers=origin)
    assert status == 400 and 'class="error"' in page


def test_with_auth_on_the_dashboard_asks_for_a_key_and_keeps_it_in_a_strict_httponly_cookie(make_broker) -> None:
    broker, port = rest_broker(make_broker, TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS=KEY,
                               TQ_AUTH__READ_ONLY_API_KEYS=READER)
    http = Http(port)
    status, _ = http.call("GET", "/")
    assert status == 303 and http.last_headers["location"].endswith("/login")
    origin = {"Origin": f"http://127.0.0.1:{port}", **FORM}
    status, page = http.call("POST", "/login", raw=urlencode({"api_key": "nope"}).encode(), headers=origin)
    assert status == 401 and "not in auth.api_keys" in page
    status, _ = http.call("POST", "/login", raw=urlencode({"api_key": READER}).encode(), headers=origin)
    cookie = http.last_headers["set-cookie"]
    assert status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = {"Cookie": cookie.split(";")[0]}
    assert http.call("GET", "/", headers=session)[0] == 200
    task_id = broker.client(api_key=KEY).submit("k", b"x").task_id
    status, _ = http.call("POST", f"/tasks/{task_id}/cancel", raw=b"", headers={**session, **origin})
    assert status == 403
    assert broker.client(api_key=KEY).status(task_id).state == "pending"
    assert READER not in broker.log() and KEY not in broker.log()
