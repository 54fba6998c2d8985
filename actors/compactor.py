"""CompactorActor: snapshots, WAL truncation, history retention and DuckDB CHECKPOINT.

Every `persistence.snapshot_interval_secs` it asks the queue actor to rotate the WAL and start an image
of the tasks live at that point, fetches the copies one slice per message (CopySlice; the queue actor
handles other messages in between, so the image is fuzzy: actors/snapshot_image.py says why replay
from the rotated segment still recovers the exact state), streams each slice to the database process
(storage.db_process `SnapshotClient`; the snapshot becomes visible only at its commit), and then tells
the queue actor that WAL segments before the new one may go. So the WAL holds at most the live data plus
one interval of changes.
Every `persistence.compact_interval_secs` (with `auto_compact`) it deletes history older than
`completed_task_retention_days` and CHECKPOINTs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from actors.dispatch import handles
from actors.envelopes import (
    Compact,
    CopySlice,
    PrepareSnapshot,
    SnapshotData,
    SnapshotSlice,
    SnapshotTaken,
    TakeSnapshot,
)
from actors.hub_actor import HubActor

log = logging.getLogger("tqbroker.compactor")

# The queue actor answers PrepareSnapshot and CopySlice in one short handler each (~20 ms at 1M tasks);
# past this it is stuck or dead, and the snapshot is retried next interval (the WAL keeps everything).
ASK_TIMEOUT_S = 30.0


class CompactorActor(HubActor):
    crash_policy = "essential"  # actors.hub_actor: a crash stops the broker; no snapshot after it

    def __init__(self, queue: Any, snapshots: Any, history: Any, persistence: Any) -> None:
        super().__init__()
        self.queue = queue
        self.snapshots = snapshots
        self.history = history
        self.persistence = persistence
        self.last_snapshot_seconds = 0.0

    def on_start(self) -> None:
        p = self.persistence
        self.every(p.snapshot_interval_secs, TakeSnapshot())
        if p.auto_compact:
            self.every(p.compact_interval_secs, Compact())

    @handles(TakeSnapshot)
    def _on_take_snapshot(self, _msg: TakeSnapshot) -> int | None:
        return self.snapshot()

    @handles(Compact)
    def _on_compact(self, _msg: Compact) -> int:
        return self.compact()

    def snapshot(self) -> int | None:
        """Writes one snapshot; returns the WAL segment replay now starts at (None if it failed)."""
        started = time.monotonic()
        try:
            data: SnapshotData = self.queue.ask(PrepareSnapshot(), timeout=ASK_TIMEOUT_S)
        except Exception as exc:  # the WAL could not rotate (disk full): try again next interval
            log.error("snapshot skipped: %s", getattr(exc, "message", None) or exc)
            return None
        try:
            if data.finished:
                self.history.append(data.finished, batch_id=data.finished_batch)
            self._write_image(data)
        except Exception as exc:  # disk full, DuckDB error: the WAL keeps everything until the next try
            log.error("snapshot failed, WAL segments kept: %s", exc)
            self.queue.tell(SnapshotTaken(wal_segment=0, finished_batch=data.finished_batch, error=str(exc)))
            return None
        self.queue.tell(SnapshotTaken(wal_segment=data.wal_segment, finished_batch=data.finished_batch))
        self.last_snapshot_seconds = time.monotonic() - started
        count = data.task_count
        log.info("snapshot of %d live tasks written in %.2f s", count, self.last_snapshot_seconds,
                 extra={"count": count, "seconds": round(self.last_snapshot_seconds, 3)})
        return data.wal_segment

    def _write_image(self, data: SnapshotData) -> None:
        """Fetches the image one CopySlice at a time (other messages run between them) and streams each
        to the database process; the snapshot becomes visible only at its commit."""
        snapshot_id = self.snapshots.begin()
        start = 0
        while start < data.task_count:
            piece: SnapshotSlice = self.queue.ask(CopySlice(start=start), timeout=ASK_TIMEOUT_S)
            if not piece.tasks:
                raise RuntimeError(f"the queue actor has no snapshot image past task {start}")
            self.snapshots.append(snapshot_id, piece.tasks)
            start += len(piece.tasks)
        self.snapshots.commit(snapshot_id, data.counters, data.wal_segment, data.task_count)

    def compact(self) -> int:
        """Deletes history past retention, then CHECKPOINTs; returns the rows deleted."""
        cutoff = time.time() - self.persistence.completed_task_retention_days * 86400
        try:
            deleted = self.history.delete_older_than(cutoff)
            self.history.checkpoint()
        except Exception as exc:
            log.error("history compaction failed: %s", exc)
            return 0
        if deleted:
            log.info("deleted %d tasks past history retention", deleted, extra={"count": deleted})
        return deleted
