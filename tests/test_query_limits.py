"""QUERY bounded in bytes and rows (`truncated`), limited to task_history, and right in every time zone.

Issue 10 item 4 (a 600 MB ROWS frame no client could read), item 7 (QUERY could read `snapshot_tasks`
and `duckdb_settings()`), issue 11 (rows cut at 10,000 silently; "failures in the last hour" wrong
outside UTC). Every test runs a real broker subprocess over a real socket (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import ROOT, BrokerProcess
from helpers import wait_for

from transport.errors import BadRequest

FRAME = 1 << 20  # a small frame limit keeps the big replies small


@pytest.fixture
def small_frame_broker(make_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return make_broker(TQ_BROKER__MAX_FRAME_BYTES=str(FRAME))


def test_a_reply_that_would_pass_the_frame_limit_stops_before_it_and_says_truncated(
        small_frame_broker: BrokerProcess) -> None:
    client = small_frame_broker.client(max_frame_bytes=FRAME)
    reply = client.query_rows("SELECT i, repeat('x', 100000) AS big FROM range(40) t(i)")  # 4 MB of rows
    assert reply.truncated is True
    assert 5 <= len(reply.rows) < 11
    assert [row[0] for row in reply.rows] == list(range(len(reply.rows)))
    assert client.query("SELECT 1 AS one") == (["one"], [[1]])  # the connection is still fine


def test_a_single_cell_bigger_than_the_frame_is_left_out_whole(small_frame_broker: BrokerProcess) -> None:
    client = small_frame_broker.client(max_frame_bytes=FRAME)
    reply = client.query_rows("SELECT repeat('x', 2000000) AS huge FROM range(3)")
    assert (reply.columns, reply.rows, reply.truncated) == (["huge"], [], True)


def test_rows_past_ten_thousand_are_cut_with_truncated_and_fewer_are_not(broker: BrokerProcess) -> None:
    client = broker.client()
    cut = client.query_rows("SELECT * FROM range(10001)")
    assert len(cut.rows) == 10_000 and cut.truncated is True
    whole = client.query_rows("SELECT * FROM range(10000)")
    assert len(whole.rows) == 10_000 and whole.truncated is False


def _cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({"PYTHONPATH": str(ROOT), "TQ_PERSISTENCE__DATA_DIR": str(broker.data_dir),
                "TQ_BROKER__PORT": str(broker.port)})
    return subprocess.run([sys.executable, "-m", "actors", "sql", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_cli_says_truncated_on_stderr_and_in_json(broker: BrokerProcess) -> None:
    cut = _cli(broker, "--json", "SELECT * FROM range(10005)")
    assert cut.returncode == 0, cut.stderr
    assert json.loads(cut.stdout)["truncated"] is True
    assert "only the first 10000 rows came back" in cut.stderr
    whole = _cli(broker, "--json", "SELECT * FROM range(5)")
    assert json.loads(whole.stdout)["truncated"] is False and "rows came back" not in whole.stderr


def test_the_offline_cli_says_truncated_too(broker: BrokerProcess) -> None:
    broker.terminate()
    cut = _cli(broker, "--json", "SELECT * FROM range(10005)")
    assert cut.returncode == 0, cut.stderr
    assert json.loads(cut.stdout)["truncated"] is True and "only the first 10000 rows" in cut.stderr


REFUSED = [
    "SELECT * FROM snapshot_tasks",
    'SELECT payload FROM "snapshot_tasks"',
    "SELECT * FROM main.snapshot_tasks",
    'SELECT * FROM "main"."Snapshot_Tasks"',
    "SELECT * FROM snapshots",
    "WITH t AS (SELECT payload FROM snapshot_tasks) SELECT * FROM t",
    "SELECT * FROM task_history WHERE task_id IN (SELECT task_id FROM snapshot_tasks)",
    "SELECT task_id FROM task_history UNION ALL SELECT task_id FROM snapshot_tasks",
    "WITH snapshot_tasks AS (SELECT 1) SELECT * FROM (SELECT 1), main.snapshot_tasks",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_tables",
    "SELECT * FROM information_schema.tables",
    "SELECT current_setting('temp_directory')",
    "SELECT * FROM query('SELECT * FROM snapshot_tasks')",
    "SELECT * FROM pragma_database_list",
    "SHOW TABLES",
    "FROM snapshot_tasks",
]
ALLOWED = [
    "SELECT count(*) FROM task_history",
    "SELECT count(*) FROM main.task_history",
    "WITH recent AS (SELECT * FROM task_history) SELECT count(*) FROM recent",
    "SELECT sum(range) FROM range(4)",
    "SELECT lower('A'), now() > TIMESTAMP '2000-01-01'",
    "DESCRIBE task_history",
]


def test_query_may_read_only_task_history_however_an_internal_table_is_named(broker: BrokerProcess) -> None:
    client = broker.client()
    answered = {}
    for sql in REFUSED:  # one broker for all: each case is one request
        try:
            answered[sql] = client.query(sql)
        except BadRequest as exc:
            assert "QUERY may read only task_history" in exc.message, (sql, exc.message)
    assert answered == {}


def test_query_still_reads_task_history_ctes_and_harmless_functions(broker: BrokerProcess) -> None:
    client = broker.client()
    assert [sql for sql in ALLOWED if not client.query(sql)[1]] == []


README_LAST_HOUR = ("SELECT worker_id, count(*) FILTER (WHERE state = 'failed') AS failures "
                    "FROM task_history WHERE finished_at > now() - INTERVAL 1 HOUR GROUP BY 1")


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/New_York"])
def test_the_readmes_last_hour_example_is_right_in_any_time_zone(make_broker: Callable[..., BrokerProcess],
                                                                  zone: str) -> None:
    client = make_broker(TZ=zone).client()
    task_id = client.submit("tz.test", b"").task_id
    assert [a.task_id for a in client.claim("w-tz", ["default"])] == [task_id]
    client.fail("w-tz", task_id, "boom", retry=False)
    wait_for(lambda: client.query("SELECT count(*) FROM task_history")[1] == [[1]])
    assert client.query(README_LAST_HOUR)[1] == [["w-tz", 1]]
    assert client.query("SELECT count(*) FROM task_history WHERE finished_at <= now()")[1] == [[1]]
