"""Request and response bodies of the REST API (docs/protocol.md, "REST API"), as msgspec Structs.

The same Structs decode requests, encode responses and generate the OpenAPI document
(`actors.http.openapi`). Bounds are the wire protocol's (`transport.messages`), so a body the API
accepts is a TaskSpec the queue accepts. Payloads and results are bytes on the wire: a JSON value is
stored as its UTF-8 JSON text; `*_base64` carries any bytes.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from transport.messages import (
    ErrorText,
    LeaseMs,
    Priority,
    QueueName,
    TaskId,
    TaskInfo,
    TaskSpec,
    Text200,
    UnixTime,
    WorkerId,
    WorkerInfo,
)

MAX_DELAY_MS = 315_360_000_000  # ten years


class ApiError(Exception):
    """A request the API refuses: `code` is a protocol error code (`actors.http.errors.STATUS`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------- requests


class TaskIn(Struct, forbid_unknown_fields=True):
    """One task to submit. `payload` (any JSON value, stored as its JSON text as sent) or `payload_base64`."""

    kind: Text200
    queue: QueueName = "default"
    priority: Priority = "normal"
    payload: msgspec.Raw | UnsetType = UNSET  # kept as the JSON text sent: no decode, no re-encode
    payload_base64: str | None = None
    run_at: UnixTime | None = None
    delay_ms: Annotated[int, Meta(ge=0, le=MAX_DELAY_MS)] | None = None
    max_retries: Annotated[int, Meta(ge=0, le=100)] | None = None
    lease_ms: LeaseMs | None = None
    unique_key: Annotated[str, Meta(min_length=1, max_length=1000)] | None = None


class BatchIn(Struct, forbid_unknown_fields=True):
    tasks: Annotated[list[TaskIn], Meta(min_length=1, max_length=10_000)]


class QueryIn(Struct, forbid_unknown_fields=True):
    sql: Annotated[str, Meta(min_length=1, max_length=100_000)]


class ClaimIn(Struct, forbid_unknown_fields=True):
    """Long-poll: waits up to `wait_ms` (0-60,000) for work when none is pending."""

    worker_id: WorkerId
    queues: Annotated[list[QueueName], Meta(min_length=1, max_length=1000)]
    max_tasks: Annotated[int, Meta(ge=1, le=1000)] = 1
    wait_ms: Annotated[int, Meta(ge=0, le=60_000)] = 0


class ResultIn(Struct, forbid_unknown_fields=True):
    """A worker's outcome. `result` (JSON value) or `result_base64`; `retry: false` fails at once."""

    worker_id: WorkerId
    ok: bool
    result: msgspec.Raw | UnsetType = UNSET  # kept as the JSON text sent
    result_base64: str | None = None
    error: ErrorText | None = None
    retry: bool = True


class HeartbeatIn(Struct, forbid_unknown_fields=True):
    active: Annotated[list[TaskId], Meta(max_length=100_000)] = []
    cpu_percent: float | None = None
    memory_bytes: Annotated[int, Meta(ge=0)] | None = None


# ---------------------------------------------------------------- responses


class SubmittedOut(Struct):
    task_id: str
    duplicate: bool


class BatchOut(Struct):
    task_ids: list[str]


class TaskOut(Struct):
    """TaskInfo; `result` when the result bytes are JSON text, else `result_base64`."""

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
    error: str | None = None
    result: Any | UnsetType = UNSET
    result_base64: str | UnsetType = UNSET


class CancelledOut(Struct):
    task_id: str
    state: str


class WorkersOut(Struct):
    workers: list[WorkerInfo]


class QueryOut(Struct):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool


class AssignmentOut(Struct):
    """A claimed task; `payload` when the payload bytes are JSON text, else `payload_base64`."""

    task_id: str
    queue: str
    kind: str
    priority: int
    attempt: int
    lease_expires_at: float
    payload: Any | UnsetType = UNSET
    payload_base64: str | UnsetType = UNSET


class ClaimOut(Struct):
    tasks: list[AssignmentOut]


class OkOut(Struct):
    ok: bool = True


class ErrorBody(Struct):
    code: str
    message: str


class ErrorOut(Struct):
    error: ErrorBody


# ---------------------------------------------------------------- conversions


def bytes_of(value: Any, b64: str | None, field: str) -> bytes | None:
    """The bytes a JSON value (its text as sent) or a base64 string stand for; None when both are absent."""
    if value is not UNSET and b64 is not None:
        raise ApiError("BAD_REQUEST", f"give {field} or {field}_base64, not both")
    if b64 is not None:
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("BAD_REQUEST", f"{field}_base64 is not valid base64") from None
    if value is UNSET:
        return None
    return bytes(value)


def task_spec(body: TaskIn, now: float | None = None) -> TaskSpec:
    if body.run_at is not None and body.delay_ms is not None:
        raise ApiError("BAD_REQUEST", "give run_at or delay_ms, not both")
    run_at = body.run_at
    if body.delay_ms is not None:
        run_at = (now if now is not None else time.time()) + body.delay_ms / 1000
    return TaskSpec(kind=body.kind, payload=bytes_of(body.payload, body.payload_base64, "payload") or b"",
                    queue=body.queue, priority=body.priority, run_at=run_at, max_retries=body.max_retries,
                    lease_ms=body.lease_ms, unique_key=body.unique_key)


def json_or_base64(data: bytes) -> tuple[Any, Any]:
    """(decoded JSON value, UNSET) when `data` is JSON text, else (UNSET, base64 of it)."""
    if data:
        try:
            return msgspec.json.decode(data), UNSET
        except msgspec.DecodeError:
            pass
    return UNSET, base64.b64encode(data).decode()


def task_out(info: TaskInfo) -> TaskOut:
    result, result_b64 = json_or_base64(info.result) if info.result is not None else (UNSET, UNSET)
    return TaskOut(task_id=info.task_id, queue=info.queue, kind=info.kind, priority=info.priority,
                   state=info.state, attempts=info.attempts, max_retries=info.max_retries,
                   submitted_at=info.submitted_at, run_at=info.run_at, started_at=info.started_at,
                   finished_at=info.finished_at, worker_id=info.worker_id, error=info.error,
                   result=result, result_base64=result_b64)


def assignment_out(a: Any) -> AssignmentOut:
    payload, payload_b64 = json_or_base64(a.payload)
    return AssignmentOut(task_id=a.task_id, queue=a.queue, kind=a.kind, priority=a.priority, attempt=a.attempt,
                         lease_expires_at=a.lease_expires_at, payload=payload, payload_base64=payload_b64)
