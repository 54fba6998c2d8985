"""The database process: the broker's DuckDB work carried over a pipe to another interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from helpers import hub_gaps, wait_for

from storage.database import QueryRefused, QueryTimeout, StorageError
from storage.db_process import DatabaseProcess, decode_tasks
from storage.model import Counters, TaskRecord

ROOT = Path(__file__).resolve().parent.parent


def finished_task(n: int) -> TaskRecord:
    now = time.time()
    return TaskRecord(task_id=f"task-{n:06d}", queue="q", kind="k", payload=b"p" * 10, priority=100,
                      state="completed", attempts=1, max_retries=3, lease_ms=1000, submitted_at=now - 2, run_at=now - 2,
                      started_at=now - 1, finished_at=now, worker_id="w1", result=b"done")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[DatabaseProcess]:
    process = DatabaseProcess(tmp_path / "tqbroker.duckdb")
    yield process
    process.close()


def test_history_written_through_the_process_reads_back(db: DatabaseProcess) -> None:
    db.history.append([finished_task(i) for i in range(100)])
    found = db.history.get("task-000042")
    assert found is not None and found.result == b"done" and found.state == "completed"
    assert db.history.get("task-999999") is None
    assert db.history.count() == 100
    columns, rows = db.history.query("SELECT count(*) AS n, min(task_id) FROM task_history", timeout=5)
    assert columns[0] == "n" and rows == [[100, "task-000000"]]


def test_refused_and_timed_out_queries_keep_their_error_types(db: DatabaseProcess) -> None:
    with pytest.raises(QueryRefused, match="only SELECT"):
        db.history.query("DELETE FROM task_history", timeout=5)
    with pytest.raises(QueryTimeout):
        db.history.query("SELECT count(*) FROM range(100000000000) a, range(10) b", timeout=0.3)
    assert db.history.count() == 0  # the process still answers after an interrupted query


def test_a_snapshot_round_trips_through_the_process(db: DatabaseProcess) -> None:
    assert db.snapshots.load_latest() is None
    tasks = [finished_task(i) for i in range(5)]
    db.snapshots.write(tasks, Counters(5, 4, 3, 2, 1), 9)
    assert db.snapshots.load_latest() == (tasks, Counters(5, 4, 3, 2, 1), 9)


def test_a_second_process_on_the_same_file_fails_with_one_line_naming_the_lock(db: DatabaseProcess) -> None:
    with pytest.raises(StorageError) as failure:
        DatabaseProcess(db.path)
    assert "locked" in failure.value.message and str(db.path) in failure.value.message
    assert "\n" not in failure.value.message


def test_a_killed_database_process_is_replaced_on_the_next_call(db: DatabaseProcess) -> None:
    db.history.append([finished_task(1)])
    first = db.pid
    os.kill(first, signal.SIGKILL)
    with pytest.raises(StorageError, match="database process"):
        db.history.count()
    assert db.history.count() == 1  # the committed row survived, and a new process answers
    assert db.pid != first


def test_the_database_process_dies_with_a_broker_killed_by_sigkill(tmp_path: Path) -> None:
    script = ("import sys; from storage.db_process import DatabaseProcess\n"
              f"db = DatabaseProcess({str(tmp_path / 'x.duckdb')!r}); print(db.pid, flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert owner.stdout is not None
    child = int(owner.stdout.readline())
    owner.kill()
    owner.wait(timeout=10)
    wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), timeout=10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_snapshot_tasks_decode_in_slices_to_the_same_list() -> None:
    tasks = [finished_task(i) for i in range(45_000)]
    assert decode_tasks(msgspec.msgpack.encode(tasks)) == tasks


def test_a_big_history_batch_goes_through_while_other_greenlets_run(db: DatabaseProcess) -> None:
    with hub_gaps() as gaps:
        db.history.append([finished_task(i) for i in range(50_000)])
    assert db.history.count() == 50_000
    assert max(gaps) < 0.25  # generous: the encode is one C call; the rest is cooperative pipe I/O


def test_a_big_snapshot_is_written_and_loaded_while_other_greenlets_run(db: DatabaseProcess) -> None:
    tasks = [finished_task(i) for i in range(60_000)]
    with hub_gaps() as gaps:
        db.snapshots.write(tasks, Counters(), 1)
        loaded = db.snapshots.load_latest()
    assert loaded is not None and loaded[0] == tasks
    assert max(gaps) < 0.25
