"""Recovery = newest snapshot + WAL replay, checked against applying the same records directly."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from storage.database import Database
from storage.model import (
    Counters,
    LeasesRenewed,
    TaskChanged,
    TaskFinished,
    TaskRecord,
    TaskSubmitted,
    WalRecord,
    apply_record,
)
from storage.recovery import recover
from storage.snapshots import SnapshotStore
from storage.wal import WriteAheadLog, segment_path, wal_directory

T0 = 1_700_000_000.0
_RECORDS = msgspec.msgpack.Decoder(list[WalRecord])


def new_task(i: int) -> TaskRecord:
    return TaskRecord(
        task_id=f"task-{i:06d}", queue=f"q{i % 3}", kind="resize", payload=bytes([i % 256]) * 20,
        priority=(i * 37) % 256, state="pending", attempts=0, max_retries=2, lease_ms=30_000,
        submitted_at=T0 + i, run_at=T0 + i, ready_seq=i, unique_key=f"u{i}" if i % 4 == 0 else None,
    )


def history_of_changes(count: int, seed: int) -> list[WalRecord]:
    """Submits, claims, lease renewals, retries and finishes, in a random but valid order."""
    rng = random.Random(seed)
    records: list[WalRecord] = []
    live: dict[str, int] = {}  # task_id -> attempts
    for i in range(count):
        task_id = f"task-{seed:02d}{i:04d}"
        records.append(TaskSubmitted(msgspec.structs.replace(new_task(i), task_id=task_id)))
        live[task_id] = 0
        if rng.random() < 0.6:
            target = rng.choice(list(live))
            live[target] += 1
            now = T0 + 1000 + i
            records.append(TaskChanged(target, "running", live[target], now, i, "w1", now, now + 30, None))
            records.append(LeasesRenewed([target], [now + 60]))
            outcome = rng.random()
            if outcome < 0.4:
                attempts = live.pop(target)
                records.append(TaskFinished(target, "completed", attempts, now + 1, "w1", b"ok", None))
            elif outcome < 0.7:
                records.append(TaskChanged(target, "scheduled", live[target], now + 5, i, None, None, None,
                                           "boom", retried=True))
        if rng.random() < 0.1 and live:
            target = rng.choice(list(live))
            attempts = live.pop(target)
            records.append(TaskFinished(target, "cancelled", attempts, T0 + 2000 + i, None, None, None))
    return records


def copy(records: list[WalRecord]) -> list[WalRecord]:
    """Replay mutates tasks in place, so the expected state is built from a separate copy."""
    return _RECORDS.decode(msgspec.msgpack.encode(records))


def encode_tasks(numbers: range) -> bytes:
    return msgspec.msgpack.encode([new_task(i) for i in numbers])


def apply_all(
    records: list[WalRecord], tasks: dict[str, TaskRecord] | None = None, counters: Counters | None = None
) -> tuple[dict[str, TaskRecord], Counters, list[TaskRecord]]:
    tasks = {} if tasks is None else tasks
    counters = Counters() if counters is None else counters
    finished = [done for r in copy(records) if (done := apply_record(r, tasks, counters)) is not None]
    return tasks, counters, finished


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def db(data_dir: Path) -> Iterator[Database]:
    database = Database(data_dir / "tqbroker.duckdb")
    yield database
    database.close()


def open_wal(data_dir: Path, start: int | None = None) -> WriteAheadLog:
    wal = WriteAheadLog(wal_directory(data_dir), segment_bytes=8192)
    wal.open(start)
    return wal


def test_an_empty_data_dir_recovers_to_nothing(data_dir: Path, db: Database) -> None:
    state = recover(data_dir, SnapshotStore(db))
    assert state.tasks == {} and state.finished == [] and state.counters == Counters()
    assert state.next_segment == 1 and state.replayed_records == 0


def test_replaying_the_whole_wal_gives_the_state_of_applying_it_directly(
    data_dir: Path, db: Database
) -> None:
    records = history_of_changes(300, seed=1)
    wal = open_wal(data_dir)
    for start in range(0, len(records), 5):
        wal.append(records[start : start + 5])
    last = wal.current_segment
    wal.close()
    tasks, counters, finished = apply_all(records)
    state = recover(data_dir, SnapshotStore(db))
    assert state.tasks == tasks
    assert state.counters == counters and counters.submitted_total == 300
    assert state.finished == finished and finished
    assert state.replayed_records == len(records)
    assert last > 1 and state.next_segment == last + 1


def changes_to(task_ids: list[str]) -> list[WalRecord]:
    """Claims every task in `task_ids`, renews some leases, then finishes every other one."""
    now = T0 + 5000
    records: list[WalRecord] = [
        TaskChanged(tid, "running", 1, now, 0, "w2", now, now + 30, None) for tid in task_ids
    ]
    records.append(LeasesRenewed(task_ids[::3], [now + 90] * len(task_ids[::3])))
    records += [TaskFinished(tid, "failed", 1, now + 2, "w2", None, "gave up") for tid in task_ids[::2]]
    return records


def test_a_snapshot_then_more_wal_records_recover_to_the_same_state(data_dir: Path, db: Database) -> None:
    before = history_of_changes(200, seed=2)
    wal = open_wal(data_dir)
    wal.append(before)
    live, counters, _ = apply_all(before)
    segment = wal.rotate()
    SnapshotStore(db).write(msgspec.msgpack.encode(list(live.values())), counters, segment)
    assert wal.delete_segments_before(segment) >= 1
    after = changes_to(sorted(live)[:40]) + history_of_changes(200, seed=3)
    for start in range(0, len(after), 9):
        wal.append(after[start : start + 9])
    wal.close()
    live_copy = {tid: msgspec.structs.replace(task) for tid, task in live.items()}
    expected_tasks, expected_counters, finished_after = apply_all(
        after, live_copy, msgspec.structs.replace(counters)
    )
    state = recover(data_dir, SnapshotStore(db))
    assert state.tasks == expected_tasks
    assert state.counters == expected_counters and expected_counters.failed_total >= 20
    assert state.finished == finished_after
    assert state.replayed_records == len(after)


def test_counters_and_every_task_field_are_restored_from_a_snapshot(data_dir: Path, db: Database) -> None:
    full = TaskRecord(
        task_id="t-full", queue="q", kind="k", payload=b"\x00\xff" * 10, priority=255, state="running",
        attempts=2, max_retries=5, lease_ms=1000, submitted_at=T0 + 0.123456789, run_at=T0 + 2.5,
        ready_seq=2**40, unique_key="u", started_at=T0 + 3.5, finished_at=None, worker_id="w",
        lease_expires_at=T0 + 4.5, result=b"r", error="boom",
    )
    tasks = [full, *(new_task(i) for i in range(50))]
    counters = Counters(submitted_total=900, completed_total=700, failed_total=50, cancelled_total=20,
                        retried_total=33)
    SnapshotStore(db).write(msgspec.msgpack.encode(tasks), counters, 4)
    state = recover(data_dir, SnapshotStore(db))
    assert state.counters == counters
    assert state.tasks == {t.task_id: t for t in tasks}
    assert state.next_segment == 4


def test_a_new_snapshot_replaces_the_previous_one(db: Database) -> None:
    store = SnapshotStore(db)
    first = store.write(encode_tasks(range(10)), Counters(submitted_total=10), 2)
    second = store.write(encode_tasks(range(3)), Counters(submitted_total=13), 5)
    assert second > first
    loaded = store.load_latest()
    assert loaded is not None
    tasks, counters, segment = loaded
    assert [t.task_id for t in tasks] == [new_task(i).task_id for i in range(3)]
    assert counters.submitted_total == 13 and segment == 5
    counts = db.run_read(lambda cur: cur.execute(
        "SELECT (SELECT count(*) FROM snapshots), (SELECT count(*) FROM snapshot_tasks)").fetchone())
    assert counts == (1, 3)


def test_an_empty_snapshot_is_a_snapshot(db: Database) -> None:
    store = SnapshotStore(db)
    assert store.load_latest() is None
    store.write(msgspec.msgpack.encode([]), Counters(), 3)
    assert store.load_latest() == ([], Counters(), 3)


def test_a_torn_wal_tail_recovers_the_records_before_it(data_dir: Path, db: Database) -> None:
    records = history_of_changes(50, seed=4)
    wal = open_wal(data_dir)
    wal.append(records[:-1])
    wal.append(records[-1:])
    wal.close()
    last = segment_path(wal_directory(data_dir), wal.current_segment)
    with last.open("r+b") as f:
        f.truncate(last.stat().st_size - 3)
    tasks, counters, _ = apply_all(records[:-1])
    state = recover(data_dir, SnapshotStore(db))
    assert state.tasks == tasks and state.counters == counters
    assert state.replayed_records == len(records) - 1


def test_snapshot_tables_mirror_the_task_and_counters_structs(db: Database) -> None:
    def columns(table: str) -> list[str]:
        return [row[0] for row in db.run_read(lambda cur: cur.execute(f"DESCRIBE {table}").fetchall())]

    assert columns("snapshot_tasks") == ["snapshot_id", *TaskRecord.__struct_fields__]
    assert set(Counters.__struct_fields__) <= set(columns("snapshots"))


def test_a_failed_snapshot_write_leaves_the_previous_snapshot_whole(db: Database) -> None:
    store = SnapshotStore(db)
    store.write(encode_tasks(range(5)), Counters(submitted_total=5), 2)
    broken = [*(new_task(i) for i in range(25_000)), {"task_id": "broken"}]  # fails after a first flush
    with pytest.raises(msgspec.ValidationError):
        store.write(msgspec.msgpack.encode(broken), Counters(), 3)
    loaded = store.load_latest()
    assert loaded is not None and len(loaded[0]) == 5 and loaded[2] == 2
    rows = db.run_read(lambda cur: cur.execute("SELECT count(*) FROM snapshot_tasks").fetchall())
    assert rows == [(5,)]


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65_535, 65_536])
def test_the_streamed_snapshot_blob_decodes_to_the_same_tasks(db: Database, count: int) -> None:
    tasks = [new_task(i) for i in range(count)]
    SnapshotStore(db).write(msgspec.msgpack.encode(tasks), Counters(submitted_total=count), 2)
    store = SnapshotStore(db)
    latest = store.latest_slices()
    assert latest is not None
    snapshot_id, counters, segment, task_count, tables = latest
    loaded = [t for table in tables for t in msgspec.msgpack.decode(store.slice_blob(snapshot_id, table),
                                                                     type=list[TaskRecord])]
    assert loaded == tasks
    assert (counters, segment, task_count) == (Counters(submitted_total=count), 2, count)
