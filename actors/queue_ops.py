"""The queue actor's operator state: per-queue settings (pause, rate limit) and the dead set.

Owned by one QueueActor and touched only from its handlers. Every change goes through a WAL record of
`storage.model` applied with `apply_record` (the same code recovery replays); this object only keeps
what the records produce in a shape the claim path can ask cheaply:

- `state`: what the WAL records hold: `settings` (= state.queues, queue → QueueSettings, only queues that
  are paused or rate-limited; empty: claims take the unchanged fast path) and the cron schedules;
- `buckets`: one token bucket per rate-limited queue (not persisted: a restart starts it full);
- `dead`: task id → death sequence number, oldest death first. The dead tasks themselves stay in the
  actor's task dict with state `failed` (payload kept), so STATUS says failed with the error until a
  requeue, and snapshots carry them like any live task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from actors.rate_limit import TokenBucket
from actors.task_index import TaskIndex
from storage.model import (
    OpsState,
    QueueSettings,
    QueueSettingsSet,
    ScheduleSet,
    TaskDied,
    TaskFinished,
    TaskRecord,
    TaskState,
    WalRecord,
)

log = logging.getLogger("tqbroker.queue")


class QueueOps:
    def __init__(self, dead_max: int, dead_retention_s: float, state: OpsState | None = None,
                 now: float = 0.0) -> None:
        self.dead_max = dead_max
        self.dead_retention_s = dead_retention_s
        self.state = state if state is not None else OpsState()  # changed only by apply_record
        self.settings: dict[str, QueueSettings] = self.state.queues
        self.buckets: dict[str, TokenBucket] = {}
        self.dead: dict[str, int] = {}
        self.dead_seq = 0
        self.next_fires: dict[str, float] = {}  # schedule name -> its next fire time (actors.cron_admin)
        self.cron_soonest = float("-inf")  # min(next_fires); -inf until the first tick computes them
        self.throttled = 0  # claims that got fewer tasks (or waited) because of a rate limit; read by metrics
        for queue, s in self.settings.items():
            if s.rate_limit is not None:
                self.buckets[queue] = TokenBucket(s.rate_limit, now)

    # ------------------------------------------------------------ settings

    def paused(self, queue: str) -> bool:
        s = self.settings.get(queue)
        return s is not None and s.paused

    def change(self, queue: str, now: float, *, paused: bool | None = None,
               rate_limit: float | None | bool = False) -> QueueSettingsSet:
        """The record for `queue`'s settings with `paused` and/or `rate_limit` replaced (False: unchanged).

        The caller applies it with apply_record(..., self.settings) and then calls `settings_applied`."""
        current = self.settings.get(queue) or QueueSettings()
        new_paused = current.paused if paused is None else paused
        new_rate = current.rate_limit if rate_limit is False else rate_limit
        return QueueSettingsSet(queue=queue, paused=new_paused, rate_limit=new_rate)

    def settings_applied(self, queue: str, now: float) -> None:
        """Keeps the token bucket of `queue` in step with its (new) rate limit."""
        s = self.settings.get(queue)
        rate = s.rate_limit if s is not None else None
        if rate is None:
            self.buckets.pop(queue, None)
        elif queue not in self.buckets or self.buckets[queue].rate != rate:
            self.buckets[queue] = TokenBucket(rate, now)

    def image(self) -> list[WalRecord]:
        """Every queue's non-default settings and every schedule as records: written at the head of each new
        WAL segment, so replay from a snapshot's segment restores them (the snapshot itself holds tasks)."""
        records: list[WalRecord] = [QueueSettingsSet(queue=q, paused=s.paused, rate_limit=s.rate_limit)
                                    for q, s in self.settings.items()]
        return records + [ScheduleSet(schedule=s) for s in self.state.schedules.values()]

    # ------------------------------------------------------------ claiming

    def claimable(self, index: TaskIndex, queue: str, now: float) -> bool:
        """Whether a claim on `queue` would get a task now: pending, not paused, a token left."""
        if not index.has_pending((queue,)):
            return False
        if not self.settings:
            return True
        if self.paused(queue):
            return False
        bucket = self.buckets.get(queue)
        return bucket is None or bucket.available(now) >= 1

    def claim_order(self, index: TaskIndex, queues: list[str], limit: int, now: float) -> list[TaskRecord]:
        """`index.claim_order` minus paused queues and within each queue's rate limit (one token a task)."""
        if not self.settings:
            return index.claim_order(queues, limit)
        open_queues = [q for q in dict.fromkeys(queues) if not self.paused(q)]
        if not any(q in self.buckets for q in open_queues):
            return index.claim_order(open_queues, limit)
        chosen: list[TaskRecord] = []
        throttled = False
        while len(chosen) < limit:
            allowed = []
            for q in open_queues:
                bucket = self.buckets.get(q)
                if bucket is None or bucket.available(now) >= 1:
                    allowed.append(q)
                elif index.has_pending((q,)):
                    throttled = True
            if not allowed:
                break
            got = index.claim_order(allowed, 1)
            if not got:
                break
            bucket = self.buckets.get(got[0].queue)
            if bucket is not None:
                bucket.take(1, now)
            chosen.append(got[0])
        if throttled:
            self.throttled += 1
        return chosen

    def throttled_queues(self, index: TaskIndex, now: float) -> Iterator[str]:
        """Rate-limited, unpaused queues with pending tasks and a token again (their waiters can be served)."""
        for queue, bucket in self.buckets.items():
            if not self.paused(queue) and index.has_pending((queue,)) and bucket.available(now) >= 1:
                yield queue

    # ------------------------------------------------------------ dead set

    def keep_dead(self, record: WalRecord) -> WalRecord:
        """A TaskFinished(failed) becomes TaskDied (the task stays, in the dead set) unless the set is off."""
        if self.dead_max > 0 and isinstance(record, TaskFinished) and record.state == TaskState.FAILED:
            return TaskDied(task_id=record.task_id, attempts=record.attempts, finished_at=record.finished_at,
                            worker_id=record.worker_id, error=record.error)
        return record

    def add_dead(self, task_id: str) -> None:
        self.dead_seq += 1
        self.dead[task_id] = self.dead_seq

    def remove_dead(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self.dead.pop(task_id, None)

    def over_bounds(self, tasks: dict[str, TaskRecord], now: float) -> list[str]:
        """Dead task ids past the count bound or older than the retention, oldest first."""
        excess = len(self.dead) - self.dead_max
        cutoff = now - self.dead_retention_s
        out = []
        for task_id in self.dead:
            task = tasks.get(task_id)
            if excess > 0 or task is None or (task.finished_at or 0.0) < cutoff:
                out.append(task_id)
                excess -= 1
            else:
                break  # oldest death first: the rest are newer and within the count
        return out

    def matching_dead(self, tasks: dict[str, TaskRecord], queue: str | None, kind: str | None) -> list[TaskRecord]:
        return [t for t in (tasks[i] for i in self.dead if i in tasks)
                if (queue is None or t.queue == queue) and (kind is None or t.kind == kind)]

    def dead_counts(self, tasks: dict[str, TaskRecord]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task_id in self.dead:
            task = tasks.get(task_id)
            if task is not None:
                counts[task.queue] = counts.get(task.queue, 0) + 1
        return counts
