"""The queue actor's side of `task_history`: finished tasks leave memory in column batches.

Owned by the QueueActor and touched only from its handlers. Writes run in the database process
(storage.db_process; a greenlet waits for the reply, the hub does not); when one finishes, the writing
greenlet *tells* the queue actor
(`HistoryWritten`) instead of touching this object, so all its state changes inside the actor.
Until a batch is committed its tasks stay here, so STATUS never misses a task between memory and disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent
from msgspec import Struct

from storage.model import Task

log = logging.getLogger("tqbroker.history")


class HistoryWritten(Struct, gc=False):
    """A history batch finished writing (`error` is None on success)."""

    task_ids: list[str]
    error: str | None = None


class HistoryLink:
    def __init__(
        self, history: Any, notify: Callable[[object], None] | None = None,
        flush_interval_s: float = 0.25, max_batch: int = 20_000, lookup_timeout_s: float | None = None,
    ) -> None:
        self.history = history
        self.lookup_timeout_s = lookup_timeout_s  # a history read past this answers UNAVAILABLE
        self.notify = notify
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._buffer: dict[str, Task] = {}
        self._in_flight: dict[str, Task] = {}
        self._last_flush = 0.0

    def add(self, task: Task) -> None:
        if self.history is not None:
            self._buffer[task.task_id] = task

    def pending(self, task_id: str) -> Task | None:
        """A finished task not yet committed to DuckDB."""
        return self._buffer.get(task_id) or self._in_flight.get(task_id)

    @property
    def backlog(self) -> int:
        return len(self._buffer) + len(self._in_flight)

    def flush_due(self, now: float) -> None:
        """Starts writing the buffer if a batch is due and no other write is under way."""
        if not self._buffer or self._in_flight or self.history is None:
            return
        if len(self._buffer) < self.max_batch and now - self._last_flush < self.flush_interval_s:
            return
        self._last_flush = now
        batch, self._buffer = self._buffer, {}
        self._in_flight = batch
        gevent.spawn(self._write, list(batch.values()))

    def take_unflushed(self) -> list[Task]:
        """Hands the buffered tasks to a snapshot, which commits them with itself."""
        batch, self._buffer = self._buffer, {}
        self._in_flight.update(batch)
        return list(batch.values())

    def _write(self, tasks: list[Task]) -> None:
        error = None
        try:
            self.history.append(tasks)
        except Exception as exc:  # disk full, DuckDB error: keep the tasks and try again later
            error = str(exc)
        if self.notify is not None:
            self.notify(HistoryWritten(task_ids=[t.task_id for t in tasks], error=error))

    def written(self, msg: HistoryWritten) -> None:
        """A write finished: forget committed tasks, or put failed ones back in the buffer."""
        for task_id in msg.task_ids:
            task = self._in_flight.pop(task_id, None)
            if msg.error is not None and task is not None:
                self._buffer[task_id] = task
        if msg.error is not None:
            log.error("writing %d tasks to task_history failed, will retry: %s", len(msg.task_ids), msg.error)

    def lookup(self, task_id: str, callback: Callable[[Task | None, str | None], None]) -> None:
        """Finds a finished task in the buffer or in DuckDB (off the actor), then calls back with
        `(task, None)`, `(None, None)` when history has no such row, or `(None, error)` when history
        could not be read (the process died, stalled past its reply bound, or hit a bad block): then
        nobody knows whether the task exists."""
        task = self.pending(task_id)
        if task is not None or self.history is None:
            callback(task, None)
            return

        def find() -> None:
            try:
                found = self.history.get(task_id, timeout=self.lookup_timeout_s)
            except Exception as exc:
                log.error("task_history lookup of %s failed: %s", task_id, exc)
                callback(None, str(getattr(exc, "message", None) or exc))
                return
            callback(found, None)

        gevent.spawn(find)
