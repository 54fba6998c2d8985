"""task_history in a real DuckDB file: round trips, the read-only QUERY, timeouts, retention, locking."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.database import SCHEMA_VERSION, Database, QueryRefused, QueryTimeout, StorageError
from storage.history import HISTORY_COLUMNS_DOC, QUERY_MAX_ROWS, TaskHistory
from storage.model import TaskRecord

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0


def finished_task(i: int, *, finished_at: float | None = None, started: bool = True) -> TaskRecord:
    return TaskRecord(
        task_id=f"task-{i:06d}", queue="default", kind="email.send", payload=b"x" * 100, priority=150,
        state="completed" if i % 3 else "failed", attempts=1, max_retries=3, lease_ms=30_000,
        submitted_at=T0 + i + 0.123456, run_at=T0 + i + 0.5, started_at=T0 + i + 1.25 if started else None,
        finished_at=finished_at if finished_at is not None else T0 + i + 2.75,
        worker_id="w-1" if started else None, result=b"ok" if i % 3 else None,
        error=None if i % 3 else "boom",
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "tqbroker.duckdb")
    yield database
    database.close()


@pytest.fixture
def history(db: Database) -> TaskHistory:
    return TaskHistory(db)


def test_the_table_has_exactly_the_documented_columns(db: Database) -> None:
    described = db.run_read(lambda cur: cur.execute("DESCRIBE task_history").fetchall())
    assert [(row[0], row[1]) for row in described] == [(name, kind) for name, kind, _ in HISTORY_COLUMNS_DOC]


def test_appended_tasks_read_back_with_times_within_a_millisecond(history: TaskHistory) -> None:
    tasks = [finished_task(i) for i in range(5)] + [finished_task(5, started=False)]
    history.append(tasks)
    for task in tasks:
        got = history.get(task.task_id)
        assert got is not None
        for field in ("task_id", "queue", "kind", "priority", "state", "attempts", "max_retries",
                      "worker_id", "result", "error"):
            assert getattr(got, field) == getattr(task, field), field
        for field in ("submitted_at", "run_at", "finished_at"):
            assert abs(getattr(got, field) - getattr(task, field)) < 0.001, field
        if task.started_at is None:
            assert got.started_at is None
        else:
            assert got.started_at is not None and abs(got.started_at - task.started_at) < 0.001
    assert history.get("no-such-task") is None
    assert history.count() == 6


def test_duration_and_payload_size_are_derived_for_queries(history: TaskHistory) -> None:
    history.append([finished_task(1), finished_task(2, started=False)])
    columns, rows = history.query(
        "SELECT task_id, duration_ms, payload_bytes FROM task_history ORDER BY task_id", timeout=5
    )
    assert columns == ["task_id", "duration_ms", "payload_bytes"]
    assert rows == [["task-000001", 1500.0, 100], ["task-000002", None, 100]]


def test_query_returns_columns_and_rows_with_iso_timestamps(history: TaskHistory) -> None:
    history.append([finished_task(1)])
    columns, rows = history.query("SELECT task_id, finished_at, result FROM task_history", timeout=5)
    assert columns == ["task_id", "finished_at", "result"]
    assert rows == [["task-000001", "2023-11-14T22:13:23.750000", b"ok"]]


def test_query_turns_every_value_into_a_msgpack_friendly_builtin(history: TaskHistory) -> None:
    sql = """WITH v AS (SELECT 1)
        SELECT 1.25::DECIMAL(5,2) AS d, '5f1a3c1e-0000-4000-8000-000000000001'::UUID AS u,
        DATE '2024-01-02' AS day, TIME '03:04:05' AS t, INTERVAL 90 SECOND AS i, [1, 2] AS l,
        {'a': TIMESTAMP '2024-01-02 03:04:05'} AS s, MAP {1: 'x'} AS m, 2::HUGEINT ** 70 AS big,
        170141183460469231731687303715884105727::HUGEINT AS huge FROM v"""
    columns, rows = history.query(sql, timeout=5)
    assert columns == ["d", "u", "day", "t", "i", "l", "s", "m", "big", "huge"]
    assert rows == [[1.25, "5f1a3c1e-0000-4000-8000-000000000001", "2024-01-02", "03:04:05", 90.0, [1, 2],
                     {"a": "2024-01-02T03:04:05"}, {1: "x"}, float(2**70),
                     "170141183460469231731687303715884105727"]]


def test_query_returns_at_most_ten_thousand_rows(history: TaskHistory) -> None:
    result = history.query_result("SELECT * FROM range(25000)", timeout=5)
    assert len(result.rows) == QUERY_MAX_ROWS and result.truncated
    assert history.query_result("SELECT * FROM range(3)", timeout=5).truncated is False


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO task_history (task_id) VALUES ('x')",
        "DELETE FROM task_history",
        "UPDATE task_history SET state = 'x'",
        "DROP TABLE task_history",
        "CREATE TABLE t (a INTEGER)",
        "COPY task_history TO '/tmp/out.csv'",
        "ATTACH '/tmp/other.duckdb' AS other",
        "PRAGMA database_size",
        "SET threads = 4",
        "CALL pragma_version()",
        "EXPLAIN SELECT 1",
        "CHECKPOINT",
        "SELECT 1; SELECT 2",
        "SELECT 1; DROP TABLE task_history",
    ],
)
def test_query_refuses_anything_but_one_select(history: TaskHistory, sql: str) -> None:
    with pytest.raises(QueryRefused):
        history.query(sql, timeout=5)
    assert history.query("SELECT count(*) FROM task_history", timeout=5) == (["count_star()"], [[0]])


def test_query_cannot_read_other_files(history: TaskHistory) -> None:
    with pytest.raises(QueryRefused, match=r"read_csv\(\) is not allowed"):
        history.query("SELECT * FROM read_csv('/etc/hostname')", timeout=5)
    with pytest.raises(QueryRefused, match="/etc/hostname is not readable"):
        history.query("SELECT * FROM '/etc/hostname'", timeout=5)


def test_query_errors_carry_duckdbs_message(history: TaskHistory) -> None:
    with pytest.raises(QueryRefused, match="no_such_column"):
        history.query("SELECT no_such_column FROM task_history", timeout=5)
    with pytest.raises(QueryRefused, match="syntax error"):
        history.query("SELEC 1", timeout=5)


def test_a_query_running_past_its_timeout_is_interrupted_quickly(history: TaskHistory) -> None:
    started = time.monotonic()
    with pytest.raises(QueryTimeout, match="api.query_timeout_secs"):
        history.query("SELECT count(*) FROM range(100000000) a, range(100000000) b", timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert history.query("SELECT 42", timeout=5) == (["42"], [[42]])


def test_delete_older_than_removes_rows_finished_before_the_cutoff(history: TaskHistory) -> None:
    history.append([finished_task(i, finished_at=T0 + i * 100) for i in range(10)])
    assert history.delete_older_than(T0 + 450) == 5
    assert history.count() == 5
    history.checkpoint()
    assert history.get("task-000004") is None and history.get("task-000005") is not None


def test_append_dedup_skips_tasks_already_in_history(history: TaskHistory) -> None:
    history.append([finished_task(i) for i in range(5)])
    history.append_dedup([finished_task(i) for i in range(3, 8)])
    _, rows = history.query("SELECT task_id, count(*) FROM task_history GROUP BY ALL ORDER BY 1", timeout=5)
    assert rows == [[f"task-{i:06d}", 1] for i in range(8)]


def test_a_second_process_opening_a_locked_file_gets_a_one_line_storage_error(db: Database) -> None:
    script = (
        "import sys\n"
        "from storage.database import Database, StorageError\n"
        "try:\n"
        f"    Database({str(db.path)!r})\n"
        "except StorageError as exc:\n"
        "    print(exc.message)\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    message = done.stdout.strip()
    assert "\n" not in message
    assert str(db.path) in message and "locked by another process" in message


def test_a_closed_database_refuses_work(tmp_path: Path) -> None:
    database = Database(tmp_path / "x.duckdb")
    database.close()
    database.close()
    with pytest.raises(StorageError, match="closed"):
        TaskHistory(database).count()


def test_reopening_keeps_rows_and_does_not_migrate_twice(tmp_path: Path) -> None:
    path = tmp_path / "x.duckdb"
    first = Database(path)
    TaskHistory(first).append([finished_task(1)])
    first.close()
    second = Database(path)
    assert TaskHistory(second).count() == 1
    versions = second.run_read(lambda cur: cur.execute("SELECT version FROM schema_version").fetchall())
    second.close()
    assert sorted(versions) == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_a_read_only_open_reads_what_a_writer_left(tmp_path: Path) -> None:
    path = tmp_path / "x.duckdb"
    writer = Database(path)
    TaskHistory(writer).append([finished_task(1)])
    writer.close()
    reader = Database(path, read_only=True)
    assert TaskHistory(reader).get("task-000001") is not None
    reader.close()


def test_a_database_from_a_newer_broker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.duckdb"
    newer = Database(path)
    newer.run_write(lambda conn: conn.execute("INSERT INTO schema_version VALUES (99)"))
    newer.close()
    with pytest.raises(StorageError, match="schema version 99"):
        Database(path)
