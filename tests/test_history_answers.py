"""History answers stay true when the database process fails (issue 10 item 5).

STATUS of a finished task that history cannot read right now is UNAVAILABLE (retryable), never
NOT_FOUND; a history batch retried after the database process was killed mid-write is not written twice.
Real brokers, real DuckDB files, real signals to the real database process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from conftest import BrokerProcess
from helpers import wait_for

from actors.worker.sdk import TaskHandle
from storage.db_process import DatabaseProcess
from storage.model import TaskRecord
from transport import messages as m
from transport.client import Client
from transport.errors import BadRequest, NotFound, Unavailable


def database_pid(broker: BrokerProcess) -> int:
    """The broker's database process (its only child running storage.db_server)."""
    assert broker.proc is not None

    def find() -> int | None:
        for task in Path(f"/proc/{broker.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                if b"storage.db_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
        return None

    return wait_for(find)


def finish(client: Client, count: int, queue: str = "default") -> list[str]:
    ids = client.submit_batch([m.TaskSpec(kind="h.test", payload=b"x", queue=queue) for _ in range(count)])
    done: list[str] = []
    while len(done) < count:
        for a in client.claim("w-h", [queue], max_tasks=100):
            client.complete("w-h", a.task_id, msgspec.msgpack.encode("ok"))
            done.append(a.task_id)
    assert sorted(done) == sorted(ids)
    return ids


def history_count(client: Client) -> int | None:
    """Rows in task_history; None when the query met a database process that was just killed."""
    try:
        return client.query("SELECT count(*) FROM task_history")[1][0][0]
    except BadRequest as exc:
        assert "database process" in exc.message
        return None


@pytest.fixture
def history_broker(make_broker: Callable[..., BrokerProcess]) -> Iterator[BrokerProcess]:
    broker = make_broker(TQ_API__QUERY_TIMEOUT_SECS="1")
    yield broker
    try:  # never leave a stopped database process behind
        os.kill(database_pid(broker), signal.SIGCONT)
    except Exception:
        pass


def test_status_of_a_finished_task_is_unavailable_while_the_database_process_is_stopped(
        history_broker: BrokerProcess) -> None:
    client = history_broker.client()
    task_id = finish(client, 1)[0]
    wait_for(lambda: history_count(client) == 1)
    client = history_broker.restart().client()  # empties the in-memory cache of recent tasks
    pid = database_pid(history_broker)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(Unavailable, match="task history cannot be read right now.*retry"):
            client.status(task_id)
        with pytest.raises(Unavailable):
            client.cancel(task_id)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert client.status(task_id).state == "completed"
    with pytest.raises(NotFound):
        client.status("no-such-task-id")


def test_a_handles_result_keeps_waiting_through_unavailable(history_broker: BrokerProcess) -> None:
    client = history_broker.client()
    task_id = finish(client, 1)[0]
    wait_for(lambda: history_count(client) == 1)
    client = history_broker.restart().client()
    pid = database_pid(history_broker)
    os.kill(pid, signal.SIGSTOP)
    seen: list[Unavailable] = []
    status = client.status

    def status_resuming_after_unavailable(tid: str) -> m.TaskInfo:
        try:
            return status(tid)
        except Unavailable as exc:  # the handle got it: let the database process go on
            seen.append(exc)
            os.kill(pid, signal.SIGCONT)
            raise

    client.status = status_resuming_after_unavailable  # type: ignore[method-assign]
    assert TaskHandle(task_id, client).result(timeout=30) == "ok"
    assert len(seen) >= 1


def test_a_history_batch_written_again_under_the_same_id_adds_no_rows(tmp_path: Path) -> None:
    db = DatabaseProcess(tmp_path / "tqbroker.duckdb")
    try:
        tasks = [finished_task(n) for n in range(50)]
        db.history.append(tasks, batch_id="run-1")
        db.history.append(tasks, batch_id="run-1")  # the retry after a lost reply
        assert db.history.count() == 50
        db.history.append(tasks[:10], batch_id="run-2")  # another batch id is another batch
        assert db.history.count() == 60
    finally:
        db.close()


def test_killing_the_database_process_under_load_never_duplicates_history(
        make_broker: Callable[..., BrokerProcess]) -> None:
    broker = make_broker(TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS="0.1")  # snapshots carry history batches too
    client = broker.client()
    completed: list[str] = []
    for _round in range(12):
        completed += finish(client, 100)
        os.kill(database_pid(broker), signal.SIGKILL)  # mid-write or between writes: both must hold
    wait_for(lambda: (history_count(client) or 0) >= len(completed), timeout=30)
    rows = client.query("SELECT count(*), count(DISTINCT task_id) FROM task_history")[1]
    assert rows == [[len(completed), len(completed)]]
    assert client.status(completed[0]).state == "completed"


def finished_task(n: int) -> TaskRecord:
    now = time.time()
    return TaskRecord(task_id=f"task-{n:06d}", queue="q", kind="k", payload=b"", priority=100,
                      state="completed", attempts=1, max_retries=3, lease_ms=1000, submitted_at=now - 2, run_at=now - 2,
                      started_at=now - 1, finished_at=now, worker_id="w1", result=b"done")
