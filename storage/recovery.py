"""Start-up recovery: the newest snapshot, then every WAL record written after it.

Replay is `storage.model.apply_record(..., as_written=True)`, the same plain assignments the queue
actor's changes produced, applied and counted once each over the snapshot's image (whose tasks may
have been copied after some of those records: actors/snapshot_image.py says why the result is exact). Tasks that a
replayed record finished are handed back separately: their history batch may or may not have reached
DuckDB before the crash, so the caller appends them with `TaskHistory.append_dedup`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import gevent
import msgspec

from storage.errors import StorageCorrupt
from storage.model import Counters, OpsState, TaskRecord, apply_record
from storage.wal import list_segments, read_segments, wal_directory

log = logging.getLogger("tqbroker.recovery")


class RecoveredState(msgspec.Struct):
    """What the broker starts from."""

    tasks: dict[str, TaskRecord]  # live tasks by id
    finished: list[TaskRecord]  # finished by replayed records: append to history with dedupe
    counters: Counters
    next_segment: int  # open the WAL at this segment number
    replayed_records: int
    seconds: float
    ops: OpsState = msgspec.field(default_factory=OpsState)  # queue settings and cron schedules


YIELD_EVERY_RECORDS = 5_000


class SnapshotSource(Protocol):
    """SnapshotStore in this process, or SnapshotClient of the database process."""

    def load_latest(self) -> tuple[list[TaskRecord], Counters, int] | None: ...


def _load_snapshot(snapshots: SnapshotSource) -> tuple[list[TaskRecord], Counters, int] | None:
    """The latest snapshot; a damaged one stops the start (StorageCorrupt naming the DuckDB file)."""
    try:
        return snapshots.load_latest()
    except StorageCorrupt as exc:
        raise StorageCorrupt(
            f"cannot start from the latest snapshot: {exc.message}. Moving the file aside is no way out: the WAL "
            "segments before that snapshot were deleted once it was written, so the live tasks it holds are "
            "nowhere else (--accept-wal-damage does not cover the database)"
        ) from exc


def recover(data_dir: Path, snapshots: SnapshotSource, *, accept_wal_damage: bool = False) -> RecoveredState:
    """Loads the newest snapshot and replays the WAL after it; cuts a torn WAL tail (see wal_reader.py).

    Raises WalCorruptError for WAL damage it must not skip, unless `accept_wal_damage` (the broker's
    --accept-wal-damage): then the damaged segments are moved aside and replay stops before the damage.
    Raises StorageError for an unreadable snapshot (the flag does not cover that).
    """
    started = time.perf_counter()
    wal_dir = wal_directory(data_dir)
    loaded = _load_snapshot(snapshots)
    if loaded is None:
        tasks: dict[str, TaskRecord] = {}
        counters, from_segment, snapshot_tasks = Counters(), 1, 0
    else:
        task_list, counters, from_segment = loaded
        tasks = {task.task_id: task for task in task_list}
        snapshot_tasks = len(task_list)
    finished: list[TaskRecord] = []
    ops = OpsState()
    replayed = 0
    for record in read_segments(wal_dir, from_segment, accept_damage=accept_wal_damage):
        done = apply_record(record, tasks, counters, ops, as_written=True)  # actors/snapshot_image.py
        if done is not None:
            finished.append(done)
        replayed += 1
        if replayed % YIELD_EVERY_RECORDS == 0:
            gevent.sleep(0)  # let /healthz and /readyz answer while a long WAL replays
    segments = list_segments(wal_dir)
    next_segment = max(from_segment, segments[-1][0] + 1 if segments else 1)
    seconds = time.perf_counter() - started
    log.info(
        "recovered %d live tasks (%d from the snapshot, %d WAL records replayed from segment %d, "
        "%d tasks finished during replay) in %.2f s",
        len(tasks), snapshot_tasks, replayed, from_segment, len(finished), seconds,
    )
    return RecoveredState(tasks, finished, counters, next_segment, replayed, seconds, ops)
