"""The queue actor's side of `task_history`: finished tasks leave memory in column batches.

Owned by the QueueActor and touched only from its handlers. Writes run in the database process
(storage.db_process; a greenlet waits for the reply, the hub does not); when one finishes, the writing
greenlet *tells* the queue actor
(`HistoryWritten`) instead of touching this object, so all its state changes inside the actor.
Until a batch is committed its tasks stay here, so STATUS never misses a task between memory and disk.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import gevent
import gevent.queue

from actors.envelopes import HistoryWritten
from storage.model import TaskRecord

log = logging.getLogger("tqbroker.history")

LOOKUP_BATCH = 4096  # ids per history read at most: one scan answers every lookup waiting, up to this many
Found = Callable[[TaskRecord | None, str | None], None]


class HistoryLink:
    """Finished tasks on their way to task_history, in batches with ids.

    Invariant: a batch keeps its id and its exact tasks until a write of it succeeds; a failed write is
    retried as the same batch. The database records each committed batch id in the same transaction
    as its rows (storage.history), so a retry of a batch that was in fact committed (the database
    process died after COMMIT, before its reply) writes nothing twice.
    """

    def __init__(
        self, history: Any, notify: Callable[[object], None] | None = None,
        flush_interval_s: float = 0.25, max_batch: int = 20_000, lookup_timeout_s: float | None = None,
    ) -> None:
        self.history = history
        self.notify = notify
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.lookup_timeout_s = lookup_timeout_s  # a history read past this answers UNAVAILABLE
        self._buffer: dict[str, TaskRecord] = {}
        self._batches: dict[str, dict[str, TaskRecord]] = {}  # being written, or failed and waiting for a retry
        self._writing: set[str] = set()
        self._run = uuid.uuid4().hex[:12]  # batch ids: unique across broker runs without any stored counter
        self._seq = 0
        self._last_flush = 0.0
        self._lookups: gevent.queue.Queue[tuple[str, Found]] = gevent.queue.Queue()  # to the lookup greenlet
        self._lookup_greenlet: gevent.Greenlet | None = None

    def add(self, task: TaskRecord) -> None:
        if self.history is not None:
            self._buffer[task.task_id] = task

    def pending(self, task_id: str) -> TaskRecord | None:
        """A finished task not yet committed to DuckDB."""
        task = self._buffer.get(task_id)
        if task is None:
            for batch in self._batches.values():
                task = batch.get(task_id)
                if task is not None:
                    break
        return task

    @property
    def backlog(self) -> int:
        return len(self._buffer) + sum(len(batch) for batch in self._batches.values())

    def flush_due(self, now: float) -> None:
        """Starts one write if none is under way: a failed batch first (same id), else the buffer once
        it is big enough or flush_interval_s has passed."""
        if self._writing or self.history is None or now - self._last_flush < self.flush_interval_s and (
                self._batches or len(self._buffer) < self.max_batch):
            return
        if self._batches:
            batch_id = next(iter(self._batches))
        elif self._buffer:
            batch_id = self._new_batch()
        else:
            return
        self._last_flush = now
        self._writing.add(batch_id)
        gevent.spawn(self._write, batch_id, list(self._batches[batch_id].values()))

    def take_unflushed(self) -> tuple[str, list[TaskRecord]]:
        """Hands the buffered tasks to a snapshot as one batch (id, tasks), which commits them with itself."""
        if not self._buffer:
            return "", []
        batch_id = self._new_batch()
        self._writing.add(batch_id)
        return batch_id, list(self._batches[batch_id].values())

    def _new_batch(self) -> str:
        self._seq += 1
        batch_id = f"{self._run}-{self._seq}"
        self._batches[batch_id], self._buffer = self._buffer, {}
        return batch_id

    def _write(self, batch_id: str, tasks: list[TaskRecord]) -> None:
        error = None
        try:
            self.history.append(tasks, batch_id=batch_id)
        except Exception as exc:  # disk full, DuckDB error, process killed: retried as the same batch
            error = str(exc)
        if self.notify is not None:
            self.notify(HistoryWritten(batch_id=batch_id, error=error))

    def written(self, msg: HistoryWritten) -> None:
        """A write finished: forget a committed batch, or keep a failed one for its retry."""
        self._writing.discard(msg.batch_id)
        if msg.error is None:
            self._batches.pop(msg.batch_id, None)
            return
        count = len(self._batches.get(msg.batch_id, ()))
        log.error("writing %d tasks to task_history failed, will retry: %s", count, msg.error)

    def lookup(self, task_id: str, callback: Found) -> None:
        """Finds a finished task in the buffer or in DuckDB (off the actor), then calls back with
        `(task, None)`, `(None, None)` when history has no such row, or `(None, error)` when history
        could not be read (the process died, stalled past its reply bound, or hit a bad block): then
        nobody knows whether the task exists.

        Lookups waiting while a read runs go together into the next read (at most LOOKUP_BATCH ids):
        one scan of task_history answers them all, each with its own task."""
        task = self.pending(task_id)
        if task is not None or self.history is None:
            callback(task, None)
            return
        self._lookups.put((task_id, callback))
        if self._lookup_greenlet is None or self._lookup_greenlet.dead:
            self._lookup_greenlet = gevent.spawn(_find_batches, self.history, self._lookups, self.lookup_timeout_s)


def _find_batches(history: Any, lookups: gevent.queue.Queue[tuple[str, Found]], timeout: float | None) -> None:
    """The lookup greenlet: owns nothing but its queue; ends when the queue is empty."""
    while not lookups.empty():
        waiting: dict[str, list[Found]] = {}
        while len(waiting) < LOOKUP_BATCH and not lookups.empty():
            task_id, callback = lookups.get_nowait()
            waiting.setdefault(task_id, []).append(callback)
        try:
            found: dict[str, TaskRecord] = history.get_many(list(waiting), timeout=timeout)
            failure = None
        except Exception as exc:
            log.error("task_history lookup of %d tasks failed: %s", len(waiting), exc)
            found, failure = {}, str(getattr(exc, "message", None) or exc)
        for task_id, callbacks in waiting.items():
            for callback in callbacks:
                try:
                    callback(found.get(task_id), failure)
                except Exception:  # one caller's failure must not leave the others without an answer
                    log.exception("answering a lookup of %s failed", task_id)
