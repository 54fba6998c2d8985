"""Protocol 1.1 messages: queue operations (docs/protocol.md "Version 1.1: queue operations").

Requests 0x10–0x1B, responses 0x50–0x5B; a v1 client never sends or receives them. Every size a client
sends is bounded here, like in `transport.messages`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from msgspec import Meta, Struct

from transport.messages import U32, Message, QueueName, TaskId, TaskInfo, TaskSpec, Text200, UnixTime

PROTOCOL_VERSION = "1.1"  # WELCOME's `version`: the newest protocol version this broker speaks

RatePerSecond = Annotated[float, Meta(gt=0, le=1_000_000)]
PageLimit = Annotated[int, Meta(ge=1, le=1000)]


class QueueInfo(Struct, frozen=True):
    """One named queue: live counts, dead tasks, and its operator settings."""

    name: str
    pending: int = 0
    scheduled: int = 0
    running: int = 0
    dead: int = 0
    paused: bool = False
    rate_limit: float | None = None


# ---------------------------------------------------------------- requests


class Pause(Message, frozen=True):
    type_byte: ClassVar[int] = 0x10
    id: U32
    queue: QueueName


class Resume(Message, frozen=True):
    type_byte: ClassVar[int] = 0x11
    id: U32
    queue: QueueName


class RateLimit(Message, frozen=True):
    type_byte: ClassVar[int] = 0x12
    id: U32
    queue: QueueName
    per_second: RatePerSecond | None = None  # nil clears the limit


class Purge(Message, frozen=True):
    type_byte: ClassVar[int] = 0x13
    id: U32
    queue: QueueName
    scheduled: bool = False  # also the scheduled (run_at in the future, or backing off) tasks


class Requeue(Message, frozen=True):
    """Dead tasks back to pending: `task_id`, or `all` of them matching the optional `queue`/`kind`."""

    type_byte: ClassVar[int] = 0x14
    id: U32
    task_id: TaskId | None = None
    all: bool = False
    queue: QueueName | None = None
    kind: Text200 | None = None


class DeleteDead(Message, frozen=True):
    """Dead tasks deleted: `task_id`, or `all` of them matching the optional `queue`/`kind`."""

    type_byte: ClassVar[int] = 0x15
    id: U32
    task_id: TaskId | None = None
    all: bool = False
    queue: QueueName | None = None
    kind: Text200 | None = None


class Queues(Message, frozen=True):
    type_byte: ClassVar[int] = 0x16
    id: U32


class DeadList(Message, frozen=True):
    """A page of the dead set, oldest death first (or newest with `newest_first`), after cursor `after`."""

    type_byte: ClassVar[int] = 0x17
    id: U32
    queue: QueueName | None = None
    kind: Text200 | None = None
    limit: PageLimit = 100
    after: Annotated[int, Meta(ge=0)] | None = None
    newest_first: bool = False


BrowseState = Literal["scheduled", "pending", "running", "dead", "completed", "failed", "cancelled"]


class Browse(Message, frozen=True):
    """A page of tasks in one state. Live states (scheduled, pending, running, dead) come from the broker's
    memory, in the order they entered that state; terminal ones from task_history by finished_at.
    `cursor`: the `next` of the previous page (opaque)."""

    type_byte: ClassVar[int] = 0x18
    id: U32
    state: BrowseState
    queue: QueueName | None = None
    kind: Text200 | None = None
    limit: PageLimit = 100
    cursor: Annotated[str, Meta(max_length=400)] | None = None
    newest_first: bool = False


class ScheduleAdd(Message, frozen=True):
    """Adds (or replaces) the named cron schedule. `since`: fire times after this count (default now); one
    earlier than now makes the missed ones fire once, coalesced, as after a broker outage."""

    type_byte: ClassVar[int] = 0x19
    id: U32
    name: Text200
    cron: Annotated[str, Meta(min_length=1, max_length=200)]
    task: TaskSpec
    tz: Annotated[str, Meta(min_length=1, max_length=64)] = "UTC"
    enabled: bool = True
    since: UnixTime | None = None


class ScheduleRemove(Message, frozen=True):
    type_byte: ClassVar[int] = 0x1A
    id: U32
    name: Text200


class Schedules(Message, frozen=True):
    type_byte: ClassVar[int] = 0x1B
    id: U32


# ---------------------------------------------------------------- responses


class Count(Message, frozen=True):
    """How many tasks a PURGE, REQUEUE or DELETE_DEAD changed."""

    type_byte: ClassVar[int] = 0x50
    id: int
    count: int


class QueueList(Message, frozen=True):
    type_byte: ClassVar[int] = 0x56
    id: int
    queues: list[QueueInfo]


class DeadPage(Message, frozen=True):
    """`next`: pass it as `after` for the following page; absent on the last page."""

    type_byte: ClassVar[int] = 0x57
    id: int
    tasks: list[TaskInfo]
    next: int | None = None


class TaskPage(Message, frozen=True):
    """`next`: pass it as `cursor` for the following page; absent on the last page. A page may hold fewer
    than `limit` tasks (a `kind` filter scans a bounded number of entries per request) and still have a
    `next`."""

    type_byte: ClassVar[int] = 0x58
    id: int
    tasks: list[TaskInfo]
    next: str | None = None


class ScheduleInfo(Struct, frozen=True):
    name: str
    cron: str
    tz: str
    kind: str
    queue: str
    priority: int
    enabled: bool
    last_fire: float  # the latest fire time handled (unix seconds)
    next_fire: float | None  # the next one, None while disabled


class ScheduleList(Message, frozen=True):
    type_byte: ClassVar[int] = 0x5B
    id: int
    schedules: list[ScheduleInfo]


OPS_REQUESTS: tuple[type[Message], ...] = (
    Pause, Resume, RateLimit, Purge, Requeue, DeleteDead, Queues, DeadList, Browse, ScheduleAdd, ScheduleRemove,
    Schedules,
)
OPS_RESPONSES: tuple[type[Message], ...] = (Count, QueueList, DeadPage, TaskPage, ScheduleList)
ADMIN_REQUESTS = OPS_REQUESTS  # the queue actor owns them (a BROWSE of a terminal state reads task_history)
READ_REQUESTS: tuple[type[Message], ...] = (Queues, DeadList, Browse, Schedules)  # answered while writes are refused
HISTORY_STATES = frozenset({"completed", "failed", "cancelled"})
