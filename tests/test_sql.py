"""Ad-hoc SQL over task history: QUERY over the wire and `python -m actors sql`, broker up and down.

Written from docs/protocol.md (QUERY: one read-only statement over `task_history`; anything but a read is
BAD_REQUEST) and the README's "Task history and SQL" (DuckDB allows one writing process, so with the broker running SQL
goes through it; with the broker stopped `sql` opens the file read-only itself), plus the issue's
`api.query_timeout_secs` bound. Every test runs a real broker subprocess (tests/conftest.py).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from conftest import ROOT, BrokerProcess, free_port
from helpers import wait_for

from transport import messages as m
from transport.client import Client
from transport.errors import BadRequest, BrokerError

QUERY_TIMEOUT_S = 0.5
WRITES = [
    "INSERT INTO task_history (task_id) VALUES ('forged')",
    "UPDATE task_history SET state = 'forged'",
    "DELETE FROM task_history",
    "DROP TABLE task_history",
    "CREATE TABLE copy AS SELECT * FROM task_history",
    "ALTER TABLE task_history ADD COLUMN x INTEGER",
    "SELECT 1; DELETE FROM task_history",
    "COPY task_history TO 'history.csv'",
    "EXPORT DATABASE 'exported'",
    "ATTACH 'other.duckdb' AS other",
    "INSTALL httpfs",
    "CHECKPOINT",
    "SET threads = 8",
    "TRUNCATE task_history",
]




def finish_tasks(client: Client, queue: str) -> dict[str, tuple[str, bytes | None, str | None]]:
    """Three tasks in `queue` reach each terminal state; returns id -> (state, result, error)."""
    ids = client.submit_batch([m.TaskSpec(kind="sql.test", payload=b"p" * 10, queue=queue) for _ in range(3)])
    done, failed, cancelled = ids
    worker = f"w-{queue}"
    claimed = {a.task_id for a in client.claim(worker, [queue], max_tasks=2)}
    assert claimed == {done, failed}
    client.complete(worker, done, b"\x00result\xff")
    client.fail(worker, failed, "it broke", retry=False)
    client.cancel(cancelled)
    return {done: ("completed", b"\x00result\xff", None), failed: ("failed", None, "it broke"),
            cancelled: ("cancelled", None, None)}


def history_rows(client: Client, queue: str, want: int) -> list[list[Any]]:
    sql = f"SELECT task_id, state, result, error FROM task_history WHERE queue = '{queue}' ORDER BY task_id"
    return wait_for(lambda: len(rows := client.query(sql)[1]) >= want and rows)


def run_cli(
    broker: BrokerProcess, *args: str, port: int | None = None, timeout: float = 60,
) -> subprocess.CompletedProcess:
    """`python -m actors sql ...` with the broker's settings in the environment, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({"PYTHONPATH": str(ROOT), "TQ_PERSISTENCE__DATA_DIR": str(broker.data_dir),
                "TQ_BROKER__PORT": str(port or broker.port), "TQ_API__QUERY_TIMEOUT_SECS": str(QUERY_TIMEOUT_S)})
    return subprocess.run([sys.executable, "-m", "actors", "sql", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def queue() -> str:
    return f"sq-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sql_broker(make_broker: Any) -> BrokerProcess:
    return make_broker(TQ_API__QUERY_TIMEOUT_SECS=str(QUERY_TIMEOUT_S))


# ---------------------------------------------------------------- QUERY over the wire


def test_query_returns_one_history_row_per_finished_task_with_its_state_result_and_error(
    sql_broker: BrokerProcess, queue: str,
) -> None:
    client = sql_broker.client()
    expected = finish_tasks(client, queue)
    rows = history_rows(client, queue, 3)
    assert {r[0]: (r[1], r[2], r[3]) for r in rows} == expected
    columns, _ = client.query("SELECT * FROM task_history LIMIT 0")
    assert {"task_id", "queue", "kind", "state", "attempts", "worker_id", "submitted_at", "finished_at",
            "duration_ms", "result", "error"} <= set(columns)


def test_history_written_before_a_sigkill_is_queryable_after_restart_exactly_once_per_task(
    sql_broker: BrokerProcess, queue: str,
) -> None:
    client = sql_broker.client()
    flushed = finish_tasks(client, queue)
    history_rows(client, queue, 3)  # these reached DuckDB before the kill
    unflushed = finish_tasks(client, queue)  # these may exist only in the WAL when the kill comes
    sql_broker.kill()
    sql_broker.restart()
    client = sql_broker.client()
    rows = history_rows(client, queue, 6)
    assert {r[0]: (r[1], r[2], r[3]) for r in rows} == {**flushed, **unflushed}
    assert len(rows) == 6, "a task replayed from the WAL was appended to task_history twice"


def test_query_refuses_every_kind_of_write_with_bad_request_and_history_is_unchanged(
    sql_broker: BrokerProcess, queue: str,
) -> None:
    client = sql_broker.client()
    finish_tasks(client, queue)
    before = history_rows(client, queue, 3)
    for sql in WRITES:
        with pytest.raises(BadRequest):
            client.query(sql)
    assert history_rows(client, queue, 3) == before
    assert client.query("SELECT count(*) FROM task_history WHERE state = 'forged'")[1] == [[0]]
    with pytest.raises(BadRequest):
        client.query("SELECT * FROM read_csv('/etc/hostname')")


def test_a_query_running_past_query_timeout_secs_is_cancelled_while_the_broker_keeps_answering(
    sql_broker: BrokerProcess,
) -> None:
    client = sql_broker.client(timeout=30.0)
    slow = "SELECT count(*) FROM range(100000000) a, range(100000000) b"
    started = time.monotonic()
    # more than the reader threads; one per connection (api.max_queries_per_connection, one running each)
    pending = [sql_broker.client(timeout=30.0).send_async(m.Query(id=0, sql=slow)) for _ in range(3)]
    stats_started = time.monotonic()
    client.stats()
    assert time.monotonic() - stats_started < 0.5, "a running QUERY held up STATS"
    for slot in pending:
        with pytest.raises(BrokerError, match="query_timeout_secs"):
            slot.get()
    assert time.monotonic() - started < QUERY_TIMEOUT_S + 5.0
    assert client.query("SELECT 42 AS answer") == (["answer"], [[42]])


# ---------------------------------------------------------------- `python -m actors sql`, broker running


def test_sql_with_the_broker_running_prints_a_table_json_or_csv(sql_broker: BrokerProcess, queue: str) -> None:
    client = sql_broker.client()
    expected = finish_tasks(client, queue)
    history_rows(client, queue, 3)
    sql = f"SELECT task_id, state, result FROM task_history WHERE queue = '{queue}' ORDER BY task_id"

    table = run_cli(sql_broker, sql)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["task_id", "state", "result"]
    assert lines[-1] == "(3 rows)"
    assert {line.split()[0]: line.split()[1] for line in lines[2:-1]} == {k: v[0] for k, v in expected.items()}

    as_json = run_cli(sql_broker, sql, "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["columns"] == ["task_id", "state", "result"]
    decoded = {r[0]: (r[1], None if r[2] is None else base64.b64decode(r[2])) for r in data["rows"]}
    assert decoded == {k: v[:2] for k, v in expected.items()}

    as_csv = run_cli(sql_broker, sql, "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert rows[0] == ["task_id", "state", "result"]
    assert {r[0]: r[1] for r in rows[1:]} == {k: v[0] for k, v in expected.items()}


def test_sql_piped_into_a_reader_that_stops_early_exits_quietly(sql_broker: BrokerProcess) -> None:
    """`sql ... | head -1`: the closed pipe ends the command with status 0 and no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({"PYTHONPATH": str(ROOT), "TQ_BROKER__PORT": str(sql_broker.port)})
    cli = subprocess.Popen([sys.executable, "-m", "actors", "sql", "SELECT repeat('x', 100) AS n FROM range(10000)"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cli.stdout is not None and cli.stderr is not None
    assert cli.stdout.readline().split() == [b"n"]
    cli.stdout.close()  # like `head -1` exiting: the rest of the 10,000 rows hit a closed pipe
    assert cli.wait(timeout=60) == 0
    assert b"Traceback" not in cli.stderr.read()


def test_sql_refusing_a_write_with_the_broker_running_exits_1_with_one_error_line(sql_broker: BrokerProcess) -> None:
    result = run_cli(sql_broker, "DELETE FROM task_history")
    assert result.returncode == 1
    assert "BAD_REQUEST" in one_error_line(result)
    assert result.stdout == ""


# ---------------------------------------------------------------- `python -m actors sql`, broker stopped


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_sql_with_the_broker_stopped_reads_the_history_file_itself(
    sql_broker: BrokerProcess, queue: str, stop: str,
) -> None:
    client = sql_broker.client()
    expected = finish_tasks(client, queue)
    history_rows(client, queue, 3)
    if stop == "SIGTERM":
        assert sql_broker.terminate() == 0
    else:
        sql_broker.kill()
    sql = f"SELECT task_id, state, error FROM task_history WHERE queue = '{queue}' ORDER BY task_id"

    as_json = run_cli(sql_broker, sql, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert "reading the history file" in as_json.stderr
    data = json.loads(as_json.stdout)
    assert {r[0]: (r[1], r[2]) for r in data["rows"]} == {k: (v[0], v[2]) for k, v in expected.items()}

    as_csv = run_cli(sql_broker, sql, "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert len(list(csv.reader(io.StringIO(as_csv.stdout)))) == 4

    table = run_cli(sql_broker, sql)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[-1] == "(3 rows)"

    sql_broker.start()  # reading it did not lock or change the file
    assert history_rows(sql_broker.client(), queue, 3)


def test_sql_with_the_broker_stopped_still_refuses_writes_with_one_error_line(
    sql_broker: BrokerProcess, queue: str,
) -> None:
    client = sql_broker.client()
    finish_tasks(client, queue)
    history_rows(client, queue, 3)
    assert sql_broker.terminate() == 0
    result = run_cli(sql_broker, "DELETE FROM task_history")
    assert result.returncode == 1
    assert "read-only" in one_error_line(result)
    count = run_cli(sql_broker, f"SELECT count(*) AS n FROM task_history WHERE queue = '{queue}'", "--json")
    assert json.loads(count.stdout)["rows"] == [[3]]


def test_sql_with_the_broker_stopped_cancels_a_query_past_query_timeout_secs(sql_broker: BrokerProcess) -> None:
    sql_broker.client().stats()  # it has finished starting (SIGTERM during start-up: see test_durability)
    assert sql_broker.terminate() == 0
    started = time.monotonic()
    result = run_cli(sql_broker, "SELECT count(*) FROM range(100000000) a, range(100000000) b", timeout=30)
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert "query_timeout_secs" in one_error_line(result)


def test_sql_with_no_broker_and_no_history_file_exits_1_naming_the_path(tmp_path: Any) -> None:
    broker = BrokerProcess(tmp_path / "never-started", {})
    result = run_cli(broker, "SELECT 1", port=free_port())
    assert result.returncode == 1
    line = one_error_line(result)
    assert str(tmp_path / "never-started") in line


def test_sql_against_the_wrong_port_while_a_broker_holds_the_file_exits_1_saying_it_is_locked(
    sql_broker: BrokerProcess,
) -> None:
    result = run_cli(sql_broker, "SELECT 1", port=free_port())
    assert result.returncode == 1
    line = one_error_line(result)
    assert "locked" in line and "tqbroker.duckdb" in line


def test_many_clients_querying_at_once_all_get_answers(sql_broker: BrokerProcess, queue: str) -> None:
    client = sql_broker.client()
    finish_tasks(client, queue)
    history_rows(client, queue, 3)
    answers: list[Any] = []

    def ask() -> None:
        with Client("127.0.0.1", sql_broker.port, timeout=30.0) as own:
            answers.append(own.query(f"SELECT count(*) FROM task_history WHERE queue = '{queue}'")[1])

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert answers == [[[3]]] * 8
