"""The persisted shapes: a task, the counters, and the write-ahead-log records.

These are shared by the queue actor (which owns and mutates tasks) and by storage (which writes and
reads them), so they live here, below both. The state machine that decides *which* record to write
lives in `actors/task_states.py`; a record only carries the absolute values a change produced, so
that replaying it is a plain assignment and replaying it twice is harmless.

Every persisted format carries a version: WAL segments in their header, snapshots in a column. When a
record changes shape, add a new record type and keep reading the old one.
"""

from __future__ import annotations

from msgspec import Struct, structs


class TaskState:
    """The states of docs/protocol.md "Task states"; terminal ones leave memory for `task_history`."""

    SCHEDULED = "scheduled"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})


class TaskRecord(Struct, gc=False):
    """One task. Mutable: only the queue actor changes it, and snapshots copy it first."""

    task_id: str
    queue: str
    kind: str
    payload: bytes
    priority: int
    state: str
    attempts: int
    max_retries: int
    lease_ms: int
    submitted_at: float
    run_at: float
    ready_seq: int = 0  # order in which it became pending: FIFO among equal priorities
    unique_key: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    lease_expires_at: float | None = None
    result: bytes | None = None
    error: str | None = None


class Counters(Struct, gc=False):
    """Totals since the data dir was created; snapshotted and rebuilt by WAL replay."""

    submitted_total: int = 0
    completed_total: int = 0
    failed_total: int = 0
    cancelled_total: int = 0
    retried_total: int = 0

    def count_finished(self, state: str) -> None:
        if state == TaskState.COMPLETED:
            self.completed_total += 1
        elif state == TaskState.FAILED:
            self.failed_total += 1
        elif state == TaskState.CANCELLED:
            self.cancelled_total += 1


# ---------------------------------------------------------------- WAL records (format version 1)


class TaskSubmitted(Struct, tag="submitted", gc=False):
    """A new task, whole. Replay: insert it; counts toward submitted_total."""

    task: TaskRecord


class TaskChanged(Struct, tag="changed", gc=False):
    """A live task's mutable fields after a claim, retry, lease expiry, reclaim or deregister."""

    task_id: str
    state: str
    attempts: int
    run_at: float
    ready_seq: int
    worker_id: str | None
    started_at: float | None
    lease_expires_at: float | None
    error: str | None
    retried: bool = False  # counts toward retried_total


class LeasesRenewed(Struct, tag="renewed", gc=False):
    """A heartbeat's lease renewals: `lease_expires_at[i]` is the new expiry of `task_ids[i]`."""

    task_ids: list[str]
    lease_expires_at: list[float]


class TaskFinished(Struct, tag="finished", gc=False):
    """A task reached a terminal state; it leaves the live set and goes to task_history."""

    task_id: str
    state: str
    attempts: int
    finished_at: float
    worker_id: str | None
    result: bytes | None
    error: str | None


class TaskDied(Struct, tag="died", gc=False):
    """A task failed for good and stays in memory, state `failed`, in the dead set (payload kept).

    Replay: like TaskFinished(failed) for the counters and history, but the task stays in `tasks`."""

    task_id: str
    attempts: int
    finished_at: float
    worker_id: str | None
    error: str | None


class DeadRemoved(Struct, tag="dead_removed", gc=False):
    """Dead tasks deleted (by an operator, or past the dead set's bounds): they leave memory."""

    task_ids: list[str]


class TasksRequeued(Struct, tag="requeued", gc=False):
    """Dead tasks made pending again with a fresh attempt count; `task_ids[i]` gets ready_seq `first_seq + i`."""

    task_ids: list[str]
    first_seq: int
    at: float


class QueueSettings(Struct, gc=False):
    """Operator settings of one named queue; a queue with the defaults has no entry."""

    paused: bool = False
    rate_limit: float | None = None  # claims per second across all workers; None = unlimited


class Schedule(Struct, gc=False):
    """A named cron schedule: at each fire time of `cron` (5 fields, in time zone `tz`) one task of this spec
    is submitted, with unique key `cron:<name>:<fire time>`. `last_fire`: the latest fire time handled
    (submitted, or coalesced into it), unix seconds; fire times after it are still to come."""

    name: str
    cron: str
    tz: str
    kind: str
    queue: str
    priority: int
    payload: bytes
    max_retries: int | None
    lease_ms: int | None
    enabled: bool
    last_fire: float


class ScheduleSet(Struct, tag="schedule_set", gc=False):
    """A schedule added, replaced, or fired (the whole schedule, with its new `last_fire`)."""

    schedule: Schedule


class ScheduleRemoved(Struct, tag="schedule_removed", gc=False):
    name: str


class OpsState(Struct, gc=False):
    """The operator state beside the tasks: per-queue settings and cron schedules (replayed from the WAL)."""

    queues: dict[str, QueueSettings] = {}
    schedules: dict[str, Schedule] = {}


class QueueSettingsSet(Struct, tag="queue_settings", gc=False):
    """The whole settings of one queue after a PAUSE, RESUME or RATE_LIMIT (absolute values)."""

    queue: str
    paused: bool
    rate_limit: float | None


WalRecord = (
    TaskSubmitted | TaskChanged | LeasesRenewed | TaskFinished | TaskDied | DeadRemoved | TasksRequeued
    | QueueSettingsSet | ScheduleSet | ScheduleRemoved
)


def apply_record(
    record: WalRecord, tasks: dict[str, TaskRecord], counters: Counters, ops: OpsState | None = None,
    *, as_written: bool = False,
) -> TaskRecord | None:
    """Replays one record onto `tasks` (and `ops`: queue settings, schedules); returns the task it finished.

    Records for tasks that are not live (already finished before the snapshot) are skipped. For
    TaskDied the task returned is a copy (for history): the live one stays in `tasks` as `failed`.
    By default a record is idempotent: applying it twice changes and counts nothing more. With
    `as_written` (recovery over a snapshot whose tasks were copied after its WAL rotation, see
    actors/snapshot_image.py) a record is applied and counted as the live actor made it, without
    re-checking the task's state: a TaskSubmitted always counts, a TaskDied always kills and counts,
    TasksRequeued and DeadRemoved change every task they name.
    """
    if isinstance(record, TaskDied | DeadRemoved | TasksRequeued | QueueSettingsSet | ScheduleSet | ScheduleRemoved):
        return apply_queue_op(record, tasks, counters, ops, as_written=as_written)
    if isinstance(record, TaskSubmitted):
        if as_written or record.task.task_id not in tasks:
            counters.submitted_total += 1
        tasks[record.task.task_id] = record.task
        return None
    if isinstance(record, LeasesRenewed):
        for task_id, expires in zip(record.task_ids, record.lease_expires_at, strict=True):
            task = tasks.get(task_id)
            if task is not None:
                task.lease_expires_at = expires
        return None
    task = tasks.get(record.task_id)
    if task is None:
        return None
    if isinstance(record, TaskChanged):
        task.state = record.state
        task.attempts = record.attempts
        task.run_at = record.run_at
        task.ready_seq = record.ready_seq
        task.worker_id = record.worker_id
        task.started_at = record.started_at
        task.lease_expires_at = record.lease_expires_at
        task.error = record.error
        if record.retried:
            counters.retried_total += 1
        return None
    task.state = record.state
    task.attempts = record.attempts
    task.finished_at = record.finished_at
    task.worker_id = record.worker_id
    task.result = record.result
    task.error = record.error
    task.lease_expires_at = None
    del tasks[record.task_id]
    counters.count_finished(record.state)
    return task


def apply_queue_op(
    record: TaskDied | DeadRemoved | TasksRequeued | QueueSettingsSet | ScheduleSet | ScheduleRemoved,
    tasks: dict[str, TaskRecord], counters: Counters, ops: OpsState | None, *, as_written: bool = False,
) -> TaskRecord | None:
    """The queue-operation records (dead set, requeue, queue settings, schedules) of `apply_record`."""
    if isinstance(record, QueueSettingsSet | ScheduleSet | ScheduleRemoved):
        if ops is not None:
            _apply_ops(record, ops)
        return None
    if isinstance(record, DeadRemoved):
        for task_id in record.task_ids:
            task = tasks.get(task_id)
            if task is not None and (as_written or task.state == TaskState.FAILED):
                del tasks[task_id]
        return None
    if isinstance(record, TasksRequeued):
        for n, task_id in enumerate(record.task_ids):
            task = tasks.get(task_id)
            if task is not None and (as_written or task.state == TaskState.FAILED):
                task.state, task.attempts, task.run_at = TaskState.PENDING, 0, record.at
                task.ready_seq = record.first_seq + n
                task.worker_id = task.started_at = task.finished_at = task.lease_expires_at = None
                task.result = task.error = None
        return None
    task = tasks.get(record.task_id)
    if task is None or (task.state == TaskState.FAILED and not as_written):  # unknown, or replayed twice
        return None
    task.state = TaskState.FAILED
    task.attempts = record.attempts
    task.finished_at = record.finished_at
    task.worker_id = record.worker_id
    task.result = None
    task.error = record.error
    task.lease_expires_at = None
    counters.count_finished(TaskState.FAILED)
    return structs.replace(task)


def _apply_ops(record: QueueSettingsSet | ScheduleSet | ScheduleRemoved, ops: OpsState) -> None:
    if isinstance(record, ScheduleSet):
        ops.schedules[record.schedule.name] = structs.replace(record.schedule)
    elif isinstance(record, ScheduleRemoved):
        ops.schedules.pop(record.name, None)
    elif record.paused or record.rate_limit is not None:
        ops.queues[record.queue] = QueueSettings(paused=record.paused, rate_limit=record.rate_limit)
    else:
        ops.queues.pop(record.queue, None)
