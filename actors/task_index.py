"""The queue actor's indexes over its live tasks: claim order, timers, counts, worker and unique keys.

Pure data structures, no actor and no I/O, so the claim order can be tested on its own. Heaps use
lazy deletion: an entry is skipped when its task no longer matches it (cancelled, re-queued with a new
`ready_seq`, lease renewed), which keeps every state change O(log n) without searching a heap.
A stale entry still holds its task (payload and result included) until it reaches the top, which for
a lease is when it would have expired (see docs/performance.md#stale-heap-entries). So a heap that grows
past twice its live entries (plus STALE_SLACK) is rebuilt from the live ones: O(n) once per n pushes,
O(1) amortised.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

from storage.model import TaskRecord, TaskState
from transport.messages import QueueStats, priority_tier

_TIER_SLOT = {"high": 3, "normal": 4, "low": 5}
STALE_SLACK = 1024  # stale entries a heap may hold beyond its live ones before it is rebuilt

_Entry = tuple[Any, int, TaskRecord]


def _pending_live(entry: _Entry) -> bool:
    neg_priority, seq, task = entry
    return task.state == TaskState.PENDING and task.ready_seq == seq and task.priority == -neg_priority


def _scheduled_live(entry: _Entry) -> bool:
    return entry[2].state == TaskState.SCHEDULED and entry[2].run_at == entry[0]


def _lease_live(entry: _Entry) -> bool:
    return entry[2].state == TaskState.RUNNING and entry[2].lease_expires_at == entry[0]


def _push(heap: list[_Entry], entry: _Entry, live: int, is_live: Callable[[_Entry], bool]) -> list[_Entry]:
    """Pushes `entry`; returns the heap, rebuilt from its live entries if stale ones dominate it."""
    heapq.heappush(heap, entry)
    if len(heap) <= 2 * live + STALE_SLACK:
        return heap
    kept = [e for e in heap if is_live(e)]
    heapq.heapify(kept)
    return kept


class QueueCounts:
    """pending, scheduled, running, then pending by tier (high, normal, low) for one named queue."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values = [0, 0, 0, 0, 0, 0]

    def as_stats(self) -> QueueStats:
        return QueueStats(*self.values)


class TaskIndex:
    """Indexes kept in step with every state change through `enter` and `leave`."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskRecord] = {}
        self.counts: dict[str, QueueCounts] = {}
        self.by_worker: dict[str, set[str]] = {}
        self.unique: dict[tuple[str, str], str] = {}
        self._pending: dict[str, list[tuple[int, int, TaskRecord]]] = {}
        self._scheduled: list[tuple[float, int, TaskRecord]] = []
        self._leases: list[tuple[float, int, TaskRecord]] = []
        self._tiebreak = 0
        self.pending_total = 0
        self.scheduled_total = 0
        self.running_total = 0

    # ------------------------------------------------------------ keeping in step

    def enter(self, task: TaskRecord) -> None:
        """Index `task` under its current state (after a change, or when it is first added)."""
        counts = self.counts.get(task.queue)
        if counts is None:
            counts = self.counts[task.queue] = QueueCounts()
        values = counts.values
        state = task.state
        if state == TaskState.PENDING:
            values[0] += 1
            heap = self._pending.get(task.queue, [])
            self._pending[task.queue] = _push(heap, (-task.priority, task.ready_seq, task), values[0], _pending_live)
            values[_TIER_SLOT[priority_tier(task.priority)]] += 1
            self.pending_total += 1
        elif state == TaskState.SCHEDULED:
            self._tiebreak += 1
            values[1] += 1
            self.scheduled_total += 1
            self._scheduled = _push(self._scheduled, (task.run_at, self._tiebreak, task), self.scheduled_total,
                                    _scheduled_live)
        elif state == TaskState.RUNNING:
            self.running_total += 1
            self.push_lease(task)
            workers = self.by_worker.get(task.worker_id or "")
            if workers is None:
                workers = self.by_worker[task.worker_id or ""] = set()
            workers.add(task.task_id)
            values[2] += 1

    def leave(self, task: TaskRecord) -> None:
        """Un-count `task` from its current state (before a change); heap entries go stale."""
        values = self.counts[task.queue].values
        state = task.state
        if state == TaskState.PENDING:
            values[0] -= 1
            values[_TIER_SLOT[priority_tier(task.priority)]] -= 1
            self.pending_total -= 1
        elif state == TaskState.SCHEDULED:
            values[1] -= 1
            self.scheduled_total -= 1
        elif state == TaskState.RUNNING:
            workers = self.by_worker.get(task.worker_id or "")
            if workers is not None:
                workers.discard(task.task_id)
                if not workers:
                    del self.by_worker[task.worker_id or ""]
            values[2] -= 1
            self.running_total -= 1

    def add_unique(self, task: TaskRecord) -> None:
        if task.unique_key is not None:
            self.unique[(task.queue, task.unique_key)] = task.task_id

    def forget(self, task: TaskRecord) -> None:
        """A task left the live set (terminal): drop its unique key and empty per-queue entries."""
        if task.unique_key is not None and self.unique.get((task.queue, task.unique_key)) == task.task_id:
            del self.unique[(task.queue, task.unique_key)]
        counts = self.counts.get(task.queue)
        if counts is not None and not any(counts.values):
            del self.counts[task.queue]
            heap = self._pending.get(task.queue)
            if heap is not None and not self._live_head(heap):
                del self._pending[task.queue]

    def push_lease(self, task: TaskRecord) -> None:
        """Indexes a running task's (new) lease expiry; the entry for its old one goes stale."""
        self._tiebreak += 1
        self._leases = _push(self._leases, (task.lease_expires_at or 0.0, self._tiebreak, task), self.running_total,
                             _lease_live)

    def heap_entries(self) -> int:
        """Entries in all heaps, live and stale (what memory the indexes hold on to)."""
        return len(self._scheduled) + len(self._leases) + sum(len(h) for h in self._pending.values())

    # ------------------------------------------------------------ queries

    @staticmethod
    def _live_head(heap: list[tuple[int, int, TaskRecord]]) -> TaskRecord | None:
        """The best pending task of one queue's heap, dropping stale entries on the way."""
        while heap:
            if _pending_live(heap[0]):
                return heap[0][2]
            heapq.heappop(heap)
        return None

    def has_pending(self, queues: Iterable[str]) -> bool:
        return any(self.counts.get(q) is not None and self.counts[q].values[0] > 0 for q in queues)

    def claim_order(self, queues: list[str], limit: int) -> list[TaskRecord]:
        """Up to `limit` pending tasks from `queues`: highest priority first, then FIFO by ready_seq.

        The tasks are removed from the pending heaps; the caller moves each to running.
        """
        chosen: list[TaskRecord] = []
        heaps = [self._pending[q] for q in dict.fromkeys(queues) if q in self._pending]
        while len(chosen) < limit and heaps:
            best_heap = None
            best_key: tuple[int, int] | None = None
            for heap in heaps:
                head = self._live_head(heap)
                if head is None:
                    continue
                key = (-head.priority, head.ready_seq)
                if best_key is None or key < best_key:
                    best_key, best_heap = key, heap
            if best_heap is None:
                break
            chosen.append(heapq.heappop(best_heap)[2])
        return chosen

    def due_scheduled(self, now: float) -> list[TaskRecord]:
        """Scheduled tasks whose run_at has come, in run_at order."""
        due: list[TaskRecord] = []
        heap = self._scheduled
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if _scheduled_live(entry):
                due.append(entry[2])
        return due

    def expired_leases(self, now: float) -> list[TaskRecord]:
        """Running tasks whose lease ran out before `now`."""
        expired: list[TaskRecord] = []
        heap = self._leases
        while heap and heap[0][0] < now:
            entry = heapq.heappop(heap)
            if _lease_live(entry):
                expired.append(entry[2])
        return expired

    def queue_stats(self) -> dict[str, QueueStats]:
        return {name: counts.as_stats() for name, counts in self.counts.items() if any(counts.values)}
