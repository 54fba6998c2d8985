"""Byte budgets (issue 10 item 4): live payloads bounded by broker.max_pending_bytes, and a snapshot of
many large payloads written in slices.

Real brokers over real sockets with real DuckDB files (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BrokerProcess
from helpers import wait_for
from test_durability import mount_tmpfs, unmount

from storage.db_process import SNAPSHOT_SLICE_TASKS, DatabaseProcess, _slices
from storage.model import Counters, TaskRecord
from transport import messages as m
from transport.client import Client
from transport.errors import InternalError, QueueFull

KIB = 1024
BUDGET = 1024 * KIB


def spec(size: int) -> m.TaskSpec:
    return m.TaskSpec(kind="budget.test", payload=b"p" * size)


def gauge(broker: BrokerProcess) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("tq_pending_payload_bytes "):
                return float(line.split()[1])
    return None


@pytest.fixture
def budget_broker(make_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return make_broker(TQ_BROKER__MAX_PENDING_BYTES=str(BUDGET), TQ_BROKER__MAINTENANCE_INTERVAL_SECS="0.1")


def test_a_submit_past_max_pending_bytes_is_queue_full_naming_the_setting(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    for _ in range(3):
        client.submit("budget.test", b"p" * (300 * KIB))
    with pytest.raises(QueueFull, match=r"broker\.max_pending_bytes \(1048576\)"):
        client.submit("budget.test", b"p" * (300 * KIB))
    assert client.stats().pending == 3
    assert wait_for(lambda: gauge(budget_broker) == 900 * KIB)


def test_a_batch_past_the_budget_is_refused_whole(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    client.submit("budget.test", b"p" * (900 * KIB))
    with pytest.raises(QueueFull, match="max_pending_bytes"):
        client.submit_batch([spec(10 * KIB) for _ in range(20)])
    assert client.stats().pending == 1
    client.submit_batch([spec(10 * KIB) for _ in range(5)])
    assert client.stats().pending == 6


def test_finished_tasks_give_their_bytes_back(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    client.submit("budget.test", b"p" * (600 * KIB))
    with pytest.raises(QueueFull):
        client.submit("budget.test", b"p" * (600 * KIB))
    [assignment] = client.claim("w-budget", ["default"])
    with pytest.raises(QueueFull):  # running tasks still hold their payload
        client.submit("budget.test", b"p" * (600 * KIB))
    client.complete("w-budget", assignment.task_id, b"")
    client.submit("budget.test", b"p" * (600 * KIB))


def test_recovered_tasks_count_against_the_budget(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    client.submit("budget.test", b"p" * (700 * KIB))
    client = budget_broker.restart().client()
    with pytest.raises(QueueFull, match="max_pending_bytes"):
        client.submit("budget.test", b"p" * (400 * KIB))
    client.submit("budget.test", b"p" * (300 * KIB))


def test_a_snapshot_is_cut_into_slices_by_task_count_and_payload_bytes() -> None:
    big = [_task(n, 1024 * KIB) for n in range(7)]
    pieces = list(_slices(big, 3 * 1024 * KIB))
    assert [len(p) for p in pieces] == [2, 2, 2, 1]  # a slice closes before passing ~3 MiB
    assert [t for p in pieces for t in p] == big
    small = [_task(n, 10) for n in range(25_000)]
    pieces = list(_slices(small, 64 * 1024 * KIB))
    assert [len(p) for p in pieces] == [SNAPSHOT_SLICE_TASKS, SNAPSHOT_SLICE_TASKS, 5_000]
    assert [t for p in pieces for t in p] == small
    assert [len(p) for p in _slices([_task(0, 5 * 1024 * KIB)], 1024 * KIB)] == [1]  # too big: alone


def test_a_snapshot_of_many_large_payloads_streams_in_slices_and_loads_back(tmp_path: Path) -> None:
    db = DatabaseProcess(tmp_path / "tqbroker.duckdb", memory_limit="128MB")
    try:
        tasks = [_task(n, 1024 * KIB, fill=n) for n in range(64)]  # 64 MiB through a 128 MB DuckDB
        db.snapshots.write(tasks, Counters(submitted_total=64), 3, slice_bytes=4 * 1024 * KIB)
        db.snapshots.write(tasks[:2], Counters(submitted_total=66), 4, slice_bytes=4 * 1024 * KIB)
        loaded = db.snapshots.load_latest()
        assert loaded is not None and loaded[0] == tasks[:2] and loaded[2] == 4
    finally:
        db.close()


def test_live_tasks_with_large_payloads_survive_a_snapshot_and_a_restart(make_broker: Callable[..., BrokerProcess]
                                                                          ) -> None:
    broker = make_broker(TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS="3600")
    client = broker.client()
    ids = [client.submit("big", bytes([n]) * (1024 * KIB)).task_id for n in range(16)]
    assert broker.terminate() == 0  # the final snapshot holds them; the WAL before it is deleted
    client = broker.start().client()
    assignments = client.claim("w-big", ["default"], max_tasks=10)
    while len(assignments) < len(ids):
        assignments += client.claim("w-big", ["default"], max_tasks=10)
    assert {a.task_id: a.payload for a in assignments} == {t: bytes([n]) * (1024 * KIB) for n, t in enumerate(ids)}


def _task(n: int, size: int, fill: int = 0) -> TaskRecord:
    return TaskRecord(task_id=f"t-{n:06d}", queue="q", kind="k", payload=bytes([fill % 256]) * size, priority=100,
                      state="pending", attempts=0, max_retries=3, lease_ms=1000, submitted_at=1.0, run_at=1.0,
                      ready_seq=n)


@pytest.fixture
def inode_starved_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir on a tmpfs with room for bytes but few inodes: a new WAL segment file cannot be made
    although free space is plenty, so a WAL append fails after the free-space check passed."""
    data_dir = tmp_path / "few-inodes"
    data_dir.mkdir()
    mount_tmpfs(data_dir, "size=64m,nr_inodes=64")
    yield data_dir
    unmount(data_dir)


def test_a_submit_whose_wal_append_fails_leaves_no_live_task(inode_starved_dir: Path) -> None:
    broker = BrokerProcess(inode_starved_dir, {"TQ_PERSISTENCE__WAL_SEGMENT_BYTES": "65536",
                                               "TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "3600"})
    broker.log_path = inode_starved_dir.parent / "broker.log"
    try:
        client = broker.start().client()
        client.stats()
        for n in itertools.count():  # take every inode left
            try:
                (inode_starved_dir / f"inode-{n}").touch()
            except OSError:
                break
        acked: list[str] = []
        with pytest.raises(InternalError, match="No space left|disk full"):
            for _ in range(100):  # 4 KiB each: a 64 KiB segment fills within 16
                acked.append(client.submit("disk", b"d" * 4096).task_id)
        stats = client.stats()
        assert (stats.pending, stats.submitted_total) == (len(acked), len(acked))
        for n in range(8):
            (inode_starved_dir / f"inode-{n}").unlink()
        claimed = wait_for(lambda: _claim_all(client))
        assert sorted(claimed) == sorted(acked)
    finally:
        broker.stop()


def _claim_all(client: Client) -> list[str] | None:
    """Every pending task id, once the WAL takes writes again (None while it does not)."""
    claimed: list[str] = []
    try:
        while batch := client.claim("w-disk", ["default"], max_tasks=10):
            claimed += [a.task_id for a in batch]
    except InternalError:
        return None
    return claimed
