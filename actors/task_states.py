"""The task state machine, in one place.

```
            submit (run_at > now)          run_at reached
  SUBMIT ──▶ scheduled ───────────────────────────────┐
     │                                                ▼
     └──────────────────────────────────────────▶ pending ──claim──▶ running ──result ok──▶ completed
                     retry after backoff (scheduled) ▲  ▲               │
                                                     │  │ lease expired │ result not ok:
                                                     │  │ worker dead   │  attempts ≤ max_retries
                                                     │  └───────────────┤──▶ scheduled (backoff)
   cancel (pending or scheduled) ──▶ cancelled       │                  └──▶ failed
                                                     └── deregister (attempt un-counted)
```

Every function here is pure: it reads a task and returns the WAL record describing the change. The
queue actor applies that record (with `storage.model.apply_record`, the same code recovery replays),
so what happens live and what replay reconstructs cannot drift apart.
"""

from __future__ import annotations

import os
import random
import sys
import time

from storage.model import TaskChanged, TaskFinished, TaskRecord, TaskState, TaskSubmitted
from transport.backoff import backoff_delay
from transport.messages import TaskSpec, priority_value


class TaskIds:
    """Unique, roughly time-ordered task ids: a per-process prefix (start time + random) and a counter.

    Cheaper than uuid4 on the submit path; unique across restarts because the prefix changes.
    """

    def __init__(self) -> None:
        self._prefix = f"{int(time.time() * 1000):011x}{int.from_bytes(os.urandom(5), 'big'):010x}"
        self._counter = 0

    def next(self) -> str:
        self._counter += 1
        return f"{self._prefix}{self._counter:06x}"

    def could_have_issued(self, task_id: str) -> bool:
        """False only for an id of this run (its prefix) whose counter was not issued yet (or is not hex)."""
        if not task_id.startswith(self._prefix):
            return True
        try:
            return int(task_id[len(self._prefix):], 16) <= self._counter
        except ValueError:
            return False


def new_task(
    spec: TaskSpec, task_id: str, now: float, ready_seq: int, default_max_retries: int, default_lease_ms: int
) -> TaskSubmitted:
    """A submitted task: `scheduled` while its run_at is in the future, else `pending`."""
    run_at = now if spec.run_at is None else spec.run_at
    state = TaskState.SCHEDULED if run_at > now else TaskState.PENDING
    task = TaskRecord(
        task_id=task_id,
        queue=sys.intern(spec.queue),  # one copy per distinct name, not one per task
        kind=sys.intern(spec.kind),
        payload=spec.payload,
        priority=priority_value(spec.priority),
        state=state,
        attempts=0,
        max_retries=default_max_retries if spec.max_retries is None else spec.max_retries,
        lease_ms=default_lease_ms if spec.lease_ms is None else spec.lease_ms,
        submitted_at=now,
        run_at=run_at,
        ready_seq=ready_seq,
        unique_key=spec.unique_key,
    )
    return TaskSubmitted(task=task)


def _changed(task: TaskRecord, **fields: object) -> TaskChanged:
    """A TaskChanged carrying the task's current mutable fields, with `fields` replacing some."""
    values: dict[str, object] = {
        "task_id": task.task_id,
        "state": task.state,
        "attempts": task.attempts,
        "run_at": task.run_at,
        "ready_seq": task.ready_seq,
        "worker_id": task.worker_id,
        "started_at": task.started_at,
        "lease_expires_at": task.lease_expires_at,
        "error": task.error,
    }
    values.update(fields)
    return TaskChanged(**values)  # type: ignore[arg-type]


def promote(task: TaskRecord, ready_seq: int) -> TaskChanged:
    """A scheduled task whose run_at came: pending, queued behind what is pending already."""
    return _changed(task, state=TaskState.PENDING, ready_seq=ready_seq)


def claim(task: TaskRecord, worker_id: str, now: float) -> TaskChanged:
    """A pending task handed to a worker: one more attempt, leased for the task's lease_ms."""
    return _changed(
        task,
        state=TaskState.RUNNING,
        attempts=task.attempts + 1,
        worker_id=worker_id,
        started_at=now,
        lease_expires_at=now + task.lease_ms / 1000.0,
    )


def complete(task: TaskRecord, result: bytes | None, now: float) -> TaskFinished:
    return TaskFinished(
        task_id=task.task_id, state=TaskState.COMPLETED, attempts=task.attempts, finished_at=now,
        worker_id=task.worker_id, result=result, error=None,
    )


def retry_delay_ms(attempts: int, base_ms: int, max_ms: int, rng: random.Random | None = None) -> float:
    """min(base × 2^(attempts-1), max) with ±20 % jitter, so retries of a burst spread out."""
    delay = backoff_delay(attempts, base_ms, max_ms)
    return delay * (rng or random).uniform(0.8, 1.2)


def fail(
    task: TaskRecord, error: str | None, retry: bool, now: float, base_ms: int, max_ms: int
) -> TaskChanged | TaskFinished:
    """A run that reported failure: retried after backoff while attempts ≤ max_retries, else failed."""
    if retry and task.attempts <= task.max_retries:
        run_at = now + retry_delay_ms(task.attempts, base_ms, max_ms) / 1000.0
        return _changed(
            task, state=TaskState.SCHEDULED, run_at=run_at, worker_id=None, lease_expires_at=None,
            error=error, retried=True,
        )
    return TaskFinished(
        task_id=task.task_id, state=TaskState.FAILED, attempts=task.attempts, finished_at=now,
        worker_id=task.worker_id, result=None, error=error,
    )


def run_lost(task: TaskRecord, reason: str, now: float, ready_seq: int) -> TaskChanged | TaskFinished:
    """A run that ended without a result (lease expired, worker dead): the run counts.

    Pending again at once while attempts ≤ max_retries, else failed with `reason` as its error.
    """
    if task.attempts <= task.max_retries:
        return _changed(
            task, state=TaskState.PENDING, ready_seq=ready_seq, worker_id=None, lease_expires_at=None,
            error=reason, retried=True,
        )
    return TaskFinished(
        task_id=task.task_id, state=TaskState.FAILED, attempts=task.attempts, finished_at=now,
        worker_id=task.worker_id, result=None, error=reason,
    )


def returned(task: TaskRecord, ready_seq: int) -> TaskChanged:
    """A running task its worker gave back on DEREGISTER: pending at once, the run un-counted."""
    return _changed(
        task, state=TaskState.PENDING, attempts=max(task.attempts - 1, 0), ready_seq=ready_seq,
        worker_id=None, started_at=None, lease_expires_at=None,
    )


def cancel(task: TaskRecord, now: float) -> TaskFinished:
    """Only pending or scheduled tasks may be cancelled; the caller checks `can_cancel` first."""
    return TaskFinished(
        task_id=task.task_id, state=TaskState.CANCELLED, attempts=task.attempts, finished_at=now,
        worker_id=None, result=None, error=None,
    )


def can_cancel(task: TaskRecord) -> bool:
    return task.state in (TaskState.PENDING, TaskState.SCHEDULED)


def holds_lease(task: TaskRecord, worker_id: str) -> bool:
    """Whether `worker_id` may report on or renew `task` right now."""
    return task.state == TaskState.RUNNING and task.worker_id == worker_id
