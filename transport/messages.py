"""Protocol v1 messages: one msgspec Struct per frame type (see docs/protocol.md).

Each class's `type_byte` ClassVar is the single source of its frame type byte; `REQUEST_TYPES` and
`RESPONSE_TYPES` are derived from it. Field constraints live in the type annotations so that msgspec's
validation error names the offending field (`... - at $.task.priority`). Every size a client can send
is bounded here or by `broker.max_frame_bytes`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from msgspec import Meta, Struct

QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]+\Z"  # with 1..MAX_QUEUE_NAME characters (docs/protocol.md)
MAX_QUEUE_NAME = 200
# The largest `result` a RESULT may carry: the default broker.max_frame_bytes (16 MiB,
# transport.frames.DEFAULT_MAX_FRAME_BYTES) less 64 KiB for the other fields. Workers fail a task whose
# result is bigger instead of sending a frame the broker would refuse (and they would resend for ever).
MAX_RESULT_BYTES = 16 * 1024 * 1024 - 64 * 1024

U32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]
Text200 = Annotated[str, Meta(min_length=1, max_length=200)]
QueueName = Annotated[str, Meta(min_length=1, max_length=MAX_QUEUE_NAME, pattern=QUEUE_NAME_PATTERN)]
TaskId = Annotated[str, Meta(min_length=1, max_length=200)]
WorkerId = Annotated[str, Meta(min_length=1, max_length=200)]
PriorityName = Literal["high", "normal", "low"]
Priority = Annotated[int, Meta(ge=0, le=255)] | PriorityName
LeaseMs = Annotated[int, Meta(ge=100, le=86_400_000)]
ErrorText = Annotated[str, Meta(max_length=65_536)]
# Unix seconds between the years 1 and 9999: finite, and representable as a DuckDB TIMESTAMP.
UnixTime = Annotated[float, Meta(ge=-62_135_596_800, le=253_402_300_799)]

PRIORITY_BY_NAME: dict[str, int] = {"high": 255, "normal": 150, "low": 50}


def priority_value(priority: int | str) -> int:
    """The numeric priority (0–255) of a TaskSpec priority given as a number or a tier name."""
    return priority if isinstance(priority, int) else PRIORITY_BY_NAME[priority]


def priority_tier(priority: int) -> PriorityName:
    """The tier a numeric priority falls in: high 200–255, normal 100–199, low 0–99."""
    if priority >= 200:
        return "high"
    return "normal" if priority >= 100 else "low"


class Message(Struct, frozen=True):
    """Base of every frame payload; `type_byte` is set by each concrete class.

    Every message carries `id`: a request's is chosen by the client, and the response to it echoes it
    (docs/protocol.md). Subclasses redeclare it with their bounds (`U32` for requests); msgspec keeps it
    the first field, so the wire form is unchanged.
    """

    type_byte: ClassVar[int]
    id: int


# ---------------------------------------------------------------- nested types


class TaskSpec(Struct, frozen=True, omit_defaults=True):
    kind: Text200
    payload: bytes = b""
    queue: QueueName = "default"
    priority: Priority = "normal"
    run_at: UnixTime | None = None
    max_retries: Annotated[int, Meta(ge=0, le=100)] | None = None
    lease_ms: LeaseMs | None = None
    unique_key: Annotated[str, Meta(min_length=1, max_length=1000)] | None = None


class Assignment(Struct, frozen=True):
    task_id: str
    queue: str
    kind: str
    payload: bytes
    priority: int
    attempt: int
    lease_expires_at: float
    max_retries: int | None = None  # v1.1: the task's retry allowance, so a worker knows its last attempt


class TaskInfo(Struct, frozen=True, omit_defaults=True):
    task_id: str
    queue: str
    kind: str
    priority: int
    state: str
    attempts: int
    max_retries: int
    submitted_at: float
    run_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    result: bytes | None = None
    error: str | None = None


class QueueStats(Struct, frozen=True):
    pending: int = 0
    scheduled: int = 0
    running: int = 0
    high: int = 0
    normal: int = 0
    low: int = 0


class StatsInfo(Struct, frozen=True, omit_defaults=True):
    pending: int
    scheduled: int
    running: int
    completed_total: int
    failed_total: int
    cancelled_total: int
    submitted_total: int
    workers_alive: int
    connections: int
    uptime_s: float
    queues: dict[str, QueueStats]
    paused: list[str] | None = None  # v1.1: paused queues; left out while none is, so v1 bytes are unchanged


class WorkerInfo(Struct, frozen=True):
    worker_id: str
    name: str
    hostname: str
    pid: int
    queues: list[str]
    concurrency: int
    metadata: dict[str, str]
    alive: bool
    last_heartbeat: float
    cpu_percent: float
    memory_bytes: int
    running: list[str]


# ---------------------------------------------------------------- requests 0x01–0x3F


class Hello(Message, frozen=True):
    type_byte: ClassVar[int] = 0x01
    id: U32
    client: Annotated[str, Meta(max_length=1000)]
    protocol: int
    api_key: Annotated[str, Meta(max_length=4096)] | None = None


class Submit(Message, frozen=True):
    type_byte: ClassVar[int] = 0x02
    id: U32
    task: TaskSpec


class SubmitBatch(Message, frozen=True):
    type_byte: ClassVar[int] = 0x03
    id: U32
    tasks: Annotated[list[TaskSpec], Meta(min_length=1, max_length=10_000)]


class Claim(Message, frozen=True):
    type_byte: ClassVar[int] = 0x04
    id: U32
    worker_id: WorkerId
    queues: Annotated[list[QueueName], Meta(min_length=1, max_length=1000)]
    max_tasks: int
    wait_ms: int


class Result(Message, frozen=True):
    type_byte: ClassVar[int] = 0x05
    id: U32
    worker_id: WorkerId
    task_id: TaskId
    ok: bool
    result: bytes | None = None
    error: ErrorText | None = None
    retry: bool | None = True  # nil means the default, true


class Heartbeat(Message, frozen=True):
    type_byte: ClassVar[int] = 0x06
    id: U32
    worker_id: WorkerId
    active: Annotated[list[TaskId], Meta(max_length=100_000)]
    cpu_percent: float | None = None
    memory_bytes: Annotated[int, Meta(ge=0)] | None = None


class Status(Message, frozen=True):
    type_byte: ClassVar[int] = 0x07
    id: U32
    task_id: TaskId


class Cancel(Message, frozen=True):
    type_byte: ClassVar[int] = 0x08
    id: U32
    task_id: TaskId


class Stats(Message, frozen=True):
    type_byte: ClassVar[int] = 0x09
    id: U32


class Register(Message, frozen=True):
    type_byte: ClassVar[int] = 0x0A
    id: U32
    worker_id: WorkerId | None = None
    name: Annotated[str, Meta(max_length=200)] | None = None
    hostname: Annotated[str, Meta(max_length=255)] | None = None
    pid: Annotated[int, Meta(ge=0)] | None = None
    queues: Annotated[list[QueueName], Meta(max_length=1000)] | None = None
    concurrency: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    metadata: (
        Annotated[
            dict[Annotated[str, Meta(max_length=200)], Annotated[str, Meta(max_length=4096)]],
            Meta(max_length=256),
        ]
        | None
    ) = None


class Deregister(Message, frozen=True):
    type_byte: ClassVar[int] = 0x0B
    id: U32
    worker_id: WorkerId


class Workers(Message, frozen=True):
    type_byte: ClassVar[int] = 0x0C
    id: U32


class Query(Message, frozen=True):
    type_byte: ClassVar[int] = 0x0D
    id: U32
    sql: Annotated[str, Meta(min_length=1, max_length=100_000)]


# ---------------------------------------------------------------- responses 0x40–0x7F


class Ok(Message, frozen=True):
    type_byte: ClassVar[int] = 0x40
    id: int


class Welcome(Message, frozen=True):
    type_byte: ClassVar[int] = 0x41
    id: int
    server: str
    protocol: int
    heartbeat_interval_ms: int
    max_batch_claim: int
    version: str | None = None  # "1.1": the queue operations of docs/protocol.md "Version 1.1" are served


class Submitted(Message, frozen=True):
    type_byte: ClassVar[int] = 0x42
    id: int
    task_id: str
    duplicate: bool


class SubmittedBatch(Message, frozen=True):
    type_byte: ClassVar[int] = 0x43
    id: int
    task_ids: list[str]


class Assigned(Message, frozen=True):
    type_byte: ClassVar[int] = 0x44
    id: int
    tasks: list[Assignment]


class TaskStatus(Message, frozen=True):
    type_byte: ClassVar[int] = 0x47
    id: int
    task: TaskInfo


class StatsReply(Message, frozen=True):
    type_byte: ClassVar[int] = 0x49
    id: int
    stats: StatsInfo


class Registered(Message, frozen=True):
    type_byte: ClassVar[int] = 0x4A
    id: int
    worker_id: str


class WorkerList(Message, frozen=True):
    type_byte: ClassVar[int] = 0x4C
    id: int
    workers: list[WorkerInfo]


class Rows(Message, frozen=True):
    type_byte: ClassVar[int] = 0x4D
    id: int
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False  # v1.1: rows were left out (row cap or frame size); docs/protocol.md


class Error(Message, frozen=True):
    type_byte: ClassVar[int] = 0x7F
    id: int
    code: str
    message: str


from transport.messages_ops import (  # noqa: E402  (protocol 1.1; they subclass Message above)
    OPS_REQUESTS,
    OPS_RESPONSES,
)

Request = (
    Hello | Submit | SubmitBatch | Claim | Result | Heartbeat | Status | Cancel | Stats | Register
    | Deregister | Workers | Query
)
Response = (
    Ok | Welcome | Submitted | SubmittedBatch | Assigned | TaskStatus | StatsReply | Registered
    | WorkerList | Rows | Error
)

_REQUEST_CLASSES: tuple[type[Message], ...] = (
    Hello, Submit, SubmitBatch, Claim, Result, Heartbeat, Status, Cancel, Stats, Register, Deregister, Workers,
    Query, *OPS_REQUESTS,
)
_RESPONSE_CLASSES: tuple[type[Message], ...] = (
    Ok, Welcome, Submitted, SubmittedBatch, Assigned, TaskStatus, StatsReply, Registered, WorkerList, Rows, Error,
    *OPS_RESPONSES,
)
REQUEST_TYPES: dict[int, type[Message]] = {cls.type_byte: cls for cls in _REQUEST_CLASSES}
RESPONSE_TYPES: dict[int, type[Message]] = {cls.type_byte: cls for cls in _RESPONSE_CLASSES}


class ErrorCode:
    """The error codes of docs/protocol.md ("Error codes", "Version 1.1"), as constants so a typo is a
    NameError, not a new code."""

    BAD_FRAME = "BAD_FRAME"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    BAD_REQUEST = "BAD_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    QUEUE_FULL = "QUEUE_FULL"
    NOT_FOUND = "NOT_FOUND"
    INVALID_STATE = "INVALID_STATE"
    NOT_LEASED = "NOT_LEASED"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"  # v1.1: history cannot be read right now; retry (docs/protocol.md)
