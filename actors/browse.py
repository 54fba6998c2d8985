"""Browsing live tasks a page at a time without copying a queue (docs/protocol.md "Version 1.1", BROWSE).

`BrowsableIndex` is the queue actor's TaskIndex plus, per queue, an append-only log of the tasks that
entered `pending` (keyed by their `ready_seq`, which only grows) and of those that entered `scheduled`
(keyed by an entry counter). A page is a binary search for the cursor and a walk of `limit` live entries:
O(log n + limit) however long the queue. Entries go stale like the heaps' (the task moved on); a log
that grows past twice its live tasks plus STALE_SLACK (checked as tasks enter and leave) is rebuilt from
the live ones, O(1) amortised, so a drained queue does not keep its finished tasks in memory.
Running tasks (at most the workers' concurrency) are sorted on demand; dead ones come from the dead set.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

from actors.task_index import STALE_SLACK, TaskIndex
from storage.model import TaskRecord, TaskState

SCAN_BUDGET = 20_000  # log entries one BROWSE may step over (stale or filtered out by kind) before it answers


class _Log:
    """keys[i] ascending; tasks[i] entered the state with mark marks[i] (its run_at for scheduled; for
    pending the mark is the key, its ready_seq, and `marks` is `keys` itself: 16 bytes per entry)."""

    __slots__ = ("keys", "tasks", "marks")

    def __init__(self, pending: bool) -> None:
        self.keys: list[int] = []
        self.tasks: list[TaskRecord] = []
        self.marks: list[float] = self.keys if pending else []  # type: ignore[assignment]

    def live(self, i: int, state: str) -> bool:
        task = self.tasks[i]
        if task.state != state:
            return False
        return task.ready_seq == self.marks[i] if state == TaskState.PENDING else task.run_at == self.marks[i]

    def compact(self, state: str) -> None:
        kept = [i for i in range(len(self.keys)) if self.live(i, state)]
        shared = self.marks is self.keys
        self.marks = [self.marks[i] for i in kept]
        self.keys = self.marks if shared else [self.keys[i] for i in kept]  # type: ignore[assignment]
        self.tasks = [self.tasks[i] for i in kept]

    def walk(self, state: str, after: int | None, newest_first: bool) -> Iterator[tuple[int, TaskRecord]]:
        """(key, task) of live entries after the cursor key, in key order (descending if newest_first)."""
        keys = self.keys
        if newest_first:
            i = (len(keys) if after is None else bisect_left(keys, after)) - 1
            while i >= 0:
                if self.live(i, state):
                    yield keys[i], self.tasks[i]
                else:
                    yield keys[i], None  # type: ignore[misc]  # stale: counts against the scan budget
                i -= 1
        else:
            i = 0 if after is None else bisect_right(keys, after)
            while i < len(keys):
                yield (keys[i], self.tasks[i]) if self.live(i, state) else (keys[i], None)  # type: ignore[misc]
                i += 1


class BrowsableIndex(TaskIndex):
    """TaskIndex that also logs entries into pending and scheduled, per queue, for BROWSE."""

    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[tuple[str, str], _Log] = {}
        self._entries = 0

    def enter(self, task: TaskRecord) -> None:
        super().enter(task)
        state = task.state
        if state == TaskState.PENDING:
            self._log(task, TaskState.PENDING, task.ready_seq, task.ready_seq, 0)
        elif state == TaskState.SCHEDULED:
            self._entries += 1
            self._log(task, TaskState.SCHEDULED, self._entries, task.run_at, 1)

    def leave(self, task: TaskRecord) -> None:
        state = task.state
        super().leave(task)
        if state == TaskState.PENDING or state == TaskState.SCHEDULED:
            log = self.logs.get((task.queue, state))
            live = self.counts[task.queue].values[0 if state == TaskState.PENDING else 1]
            if log is not None and len(log.keys) > 2 * live + STALE_SLACK:  # drained: drop the stale tasks
                log.compact(state)

    def _log(self, task: TaskRecord, state: str, key: int, mark: float, slot: int) -> None:
        log = self.logs.get((task.queue, state))
        if log is None:
            log = self.logs[(task.queue, state)] = _Log(state == TaskState.PENDING)
        elif log.keys and key <= log.keys[-1]:  # recovery enters in ready_seq order; never out of order live
            return self._insert(log, key, task, mark)
        log.keys.append(key)
        log.tasks.append(task)
        if log.marks is not log.keys:
            log.marks.append(mark)
        if len(log.keys) > 2 * self.counts[task.queue].values[slot] + STALE_SLACK:
            log.compact(state)

    @staticmethod
    def _insert(log: _Log, key: int, task: TaskRecord, mark: float) -> None:
        i = bisect_left(log.keys, key)
        log.keys.insert(i, key)
        log.tasks.insert(i, task)
        if log.marks is not log.keys:
            log.marks.insert(i, mark)


def live_page(index: BrowsableIndex, dead: dict[str, int], state: str, queue: str | None, kind: str | None,
              limit: int, after: int | None, newest_first: bool) -> tuple[list[TaskRecord], int | None]:
    """Up to `limit` tasks in live `state` after cursor `after`; and the cursor of the next page, if any."""
    if state == TaskState.RUNNING:
        return _sorted_page(_running(index, queue), kind, limit, after, newest_first)
    if state == "dead":
        entries = iter(reversed(dead.items()) if newest_first else dead.items())
        tasks = index.tasks
        walk = ((seq, tasks.get(i)) for i, seq in entries
                if after is None or (seq < after if newest_first else seq > after))
        return _take(walk, queue, kind, limit)
    logs = [log for (q, s), log in index.logs.items() if s == state and (queue is None or q == queue)]
    walks = [log.walk(state, after, newest_first) for log in logs]
    merged = walks[0] if len(walks) == 1 else heapq.merge(*walks, key=lambda e: e[0], reverse=newest_first)
    return _take(merged, queue, kind, limit)


def _take(entries: Iterator[tuple[int, TaskRecord | None]], queue: str | None, kind: str | None,
          limit: int) -> tuple[list[TaskRecord], int | None]:
    page: list[TaskRecord] = []
    scanned, last = 0, None
    for key, task in entries:
        if task is not None and (queue is None or task.queue == queue) and (kind is None or task.kind == kind):
            if len(page) == limit:
                return page, last
            page.append(task)
        scanned += 1
        last = key
        if scanned >= SCAN_BUDGET + limit:
            return page, last
    return page, None


def _running(index: TaskIndex, queue: str | None) -> list[TaskRecord]:
    tasks = index.tasks
    return [tasks[i] for ids in index.by_worker.values() for i in ids
            if i in tasks and (queue is None or tasks[i].queue == queue)]


def _sorted_page(tasks: list[TaskRecord], kind: str | None, limit: int, after: int | None,
                 newest_first: bool) -> tuple[list[TaskRecord], int | None]:
    chosen = sorted((t for t in tasks if kind is None or t.kind == kind), key=lambda t: t.ready_seq,
                    reverse=newest_first)
    if after is not None:
        chosen = [t for t in chosen if (t.ready_seq < after if newest_first else t.ready_seq > after)]
    if len(chosen) > limit:
        return chosen[:limit], chosen[limit - 1].ready_seq
    return chosen, None
