"""Request and response bodies of the queue-operation routes (docs/protocol.md "REST API", queue operations).

The broker's own Structs (`QueueInfo`, `ScheduleInfo`) are answered as they are; tasks go out as `TaskOut`.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from actors.http.schemas import TaskIn, TaskOut
from transport.messages import QueueName, TaskId, Text200
from transport.messages_ops import RatePerSecond, ScheduleInfo


class PurgeIn(Struct, forbid_unknown_fields=True):
    scheduled: bool = False  # also the scheduled (run_at in the future, or backing off) tasks


class RateLimitIn(Struct, forbid_unknown_fields=True):
    per_second: RatePerSecond | None  # null clears the limit


class DeadIn(Struct, forbid_unknown_fields=True):
    """One dead task (`task_id`) or `all` of them, optionally only those of `queue` and/or `kind`."""

    task_id: TaskId | None = None
    all: bool = False
    queue: QueueName | None = None
    kind: Text200 | None = None


class ScheduleIn(Struct, forbid_unknown_fields=True):
    """A cron schedule: every fire submits `task` (its `run_at` and `delay_ms` must be absent)."""

    cron: Annotated[str, Meta(min_length=1, max_length=200)]
    task: TaskIn
    tz: Annotated[str, Meta(min_length=1, max_length=64)] = "UTC"
    enabled: bool = True


class CountOut(Struct):
    count: int


class QueueOut(Struct):
    """One queue: live counts per tier (STATS) and dead tasks and operator settings (QUEUES)."""

    pending: int = 0
    scheduled: int = 0
    running: int = 0
    high: int = 0
    normal: int = 0
    low: int = 0
    dead: int = 0
    paused: bool = False
    rate_limit: float | None = None


class QueuesOut(Struct):
    queues: dict[str, QueueOut]


class TaskPageOut(Struct):
    """`next`: pass it as `cursor` for the following page; absent (null) on the last page."""

    tasks: list[TaskOut]
    next: str | None = None


class DeadPageOut(Struct):
    """`next`: pass it as `after` for the following page; null on the last page."""

    tasks: list[TaskOut]
    next: int | None = None


class SchedulesOut(Struct):
    schedules: list[ScheduleInfo]


class ScheduleOut(Struct):
    name: str
    ok: bool = True
