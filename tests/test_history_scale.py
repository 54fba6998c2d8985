"""History lookups that do not scan the whole table (issue 14, items 1 and 2).

Real brokers with real DuckDB files for what clients see; TaskHistory on a real file for the storage
contracts (keys written and deleted with their rows, duplicates skipped, old files migrated).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import msgspec
import pytest
from conftest import BrokerProcess
from helpers import wait_for
from test_history_answers import database_pid, history_count

from actors.recent import RecentTasks, task_bytes
from actors.task_states import TaskIds
from storage.database import Database
from storage.history import TaskHistory
from storage.history_ids import KEY_SQL, id_key
from storage.model import TaskRecord
from transport import messages as m
from transport.client import Client
from transport.errors import NotFound, Unavailable


def finish_each_with_its_id(client: Client, count: int) -> list[str]:
    """Submits `count` tasks and completes each with its own id as the result."""
    ids = client.submit_batch([m.TaskSpec(kind="hs.test", payload=b"x") for _ in range(count)])
    done = 0
    while done < count:
        for a in client.claim("w-hs", ["default"], max_tasks=100):
            client.complete("w-hs", a.task_id, a.task_id.encode())
            done += 1
    return ids


def finished(task_id: str, finished_at: float) -> TaskRecord:
    return TaskRecord(task_id=task_id, queue="q", kind="k", payload=b"", priority=100, state="completed", attempts=1,
                      max_retries=3, lease_ms=1000, submitted_at=finished_at - 1, run_at=finished_at - 1,
                      started_at=finished_at - 0.5, finished_at=finished_at, worker_id="w1", result=task_id.encode())


def some_ids(count: int) -> list[str]:
    ids = TaskIds()
    return [ids.next() for _ in range(count)]


def test_status_of_finished_tasks_the_cache_does_not_hold_comes_from_history_each_with_its_own_answer(
        make_broker: Callable[..., BrokerProcess]) -> None:
    broker = make_broker(TQ_PERSISTENCE__RECENT_RESULTS_BYTES="0")  # nothing kept in memory: every STATUS reads
    client = broker.client()
    ids = finish_each_with_its_id(client, 300)
    wait_for(lambda: history_count(client) == 300)
    never_issued = ids[-1][:-6] + "ffffff"  # this run's prefix, a counter it has not reached
    replies = client.pipeline([m.Status(id=0, task_id=t) for t in [*ids, never_issued]], return_exceptions=True)
    assert [r.task.result for r in replies[:-1]] == [t.encode() for t in ids]
    assert isinstance(replies[-1], NotFound)
    client = broker.restart().client()  # a new run: the old ids are another run's now
    assert client.status(ids[0]).result == ids[0].encode()
    assert [r.task.state for r in client.pipeline([m.Status(id=0, task_id=t) for t in ids])] == ["completed"] * 300


def test_an_id_that_cannot_exist_is_not_found_even_while_history_cannot_be_read(
        make_broker: Callable[..., BrokerProcess]) -> None:
    broker = make_broker(TQ_API__QUERY_TIMEOUT_SECS="1")
    client = broker.client()
    old = finish_each_with_its_id(client, 1)[0]
    wait_for(lambda: history_count(client) == 1)
    client = broker.restart().client()
    pid = database_pid(broker)
    os.kill(pid, signal.SIGSTOP)
    try:
        future = f"{int((time.time() + 86400) * 1000):011x}" + old[11:]
        not_issued = client.submit("hs.test").task_id[:-6] + "ffffff"  # this run's prefix, a counter not reached
        for impossible in ["no-such-task", old.upper(), future, not_issued]:
            with pytest.raises(NotFound, match="no task with id"):
                client.status(impossible)
        with pytest.raises(Unavailable):  # a real old id: history must answer, and cannot
            client.status(old)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert client.status(old).state == "completed"


def test_history_finds_each_task_and_only_within_its_keys(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.duckdb")
    try:
        history, now = TaskHistory(db), time.time()
        ids = some_ids(3000)
        history.append([finished(t, now - 3600 + n) for n, t in enumerate(ids)], batch_id="b1")
        found = history.get_many([ids[5], ids[2999], ids[5], "not-a-task", ids[0][:-6] + "ffffff"])
        assert sorted(found) == sorted([ids[5], ids[2999]])
        assert all(task.result == task_id.encode() for task_id, task in found.items())
        assert history.get(ids[1234]).result == ids[1234].encode()
        history.append([finished("legacy-id", now)], batch_id="b2")  # not of the broker's format: no key
        assert history.get("legacy-id").task_id == "legacy-id"
    finally:
        db.close()


def test_retention_deletes_rows_and_their_keys_together(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.duckdb")
    try:
        history, now = TaskHistory(db), time.time()
        ids = some_ids(20)
        history.append([finished(t, now - 86400 * 8 if n < 10 else now) for n, t in enumerate(ids)])
        assert history.delete_older_than(now - 86400 * 7) == 10
        assert history.count() == 10
        keys = db.run_read(lambda cur: cur.execute("SELECT count(*) FROM history_keys").fetchall())
        assert keys == [(10,)]
        assert history.get(ids[0]) is None and history.get(ids[10]) is not None
    finally:
        db.close()


def test_append_dedup_writes_only_the_tasks_not_already_in_history(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.duckdb")
    try:
        history, now = TaskHistory(db), time.time()
        ids = some_ids(100)
        tasks = [finished(t, now - 100 + n) for n, t in enumerate(ids)]
        history.append(tasks[:60])
        history.append_dedup(tasks[40:])  # after a crash the WAL replays 40..59 again
        rows = db.run_read(lambda cur: cur.execute(
            "SELECT count(*), count(DISTINCT task_id) FROM task_history").fetchall())
        keys = db.run_read(lambda cur: cur.execute("SELECT count(*) FROM history_keys").fetchall())
        assert rows == [(100, 100)] and keys == [(100,)]
        assert history.get(ids[99]) is not None
    finally:
        db.close()


def test_a_file_from_before_history_keys_gets_its_keys_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "h.duckdb"
    db = Database(path)
    ids = some_ids(50)
    TaskHistory(db).append([finished(t, time.time()) for t in ids])

    def back_to_version_3(conn: duckdb.DuckDBPyConnection) -> None:
        conn.execute("DROP TABLE history_keys")
        conn.execute("DELETE FROM schema_version WHERE version = 4")

    db.run_write(back_to_version_3)
    db.close()
    db = Database(path)
    try:
        assert TaskHistory(db).get(ids[17]).result == ids[17].encode()
    finally:
        db.close()


def test_the_key_sql_computes_the_same_key_as_python_and_keys_grow_with_ids() -> None:
    ids = some_ids(5)
    cases = [*ids, ids[0] + "1", "no-such-task", ids[0].upper(), "0" * 27]
    conn = duckdb.connect()
    in_sql = [conn.execute(f"SELECT {KEY_SQL} FROM (SELECT $1 AS task_id)", [t]).fetchall()[0][0] for t in cases]
    assert in_sql == [id_key(t) for t in cases]
    assert in_sql[:5] == sorted(in_sql[:5]) and None not in in_sql[:5] and in_sql[6:] == [None, None, None]


def test_the_recent_cache_keeps_its_bytes_under_its_bound_dropping_the_oldest() -> None:
    tasks = [msgspec.structs.replace(finished(t, 1.0), result=b"r" * 1000) for t in some_ids(10)]
    recent = RecentTasks(max_bytes=task_bytes(tasks[0]) * 3)
    for task in tasks:
        recent.add(task)
    assert len(recent) == 3 and recent.bytes <= recent.max_bytes
    assert recent.get(tasks[0].task_id) is None and recent.get(tasks[9].task_id) is tasks[9]
    recent.add(msgspec.structs.replace(tasks[0], result=b"r" * 10_000))  # bigger than the bound: not kept
    assert len(recent) == 3
