"""The /api/v1 resources: one class per noun, each sending protocol messages through the `Gateway`.

Every handler decodes its body into a Struct of `actors.http.schemas` (bounded by
`broker.max_frame_bytes`), builds the same request message a TCP client would send, and turns the
owner's answer into a response Struct or an `ApiError` (`actors.http.errors.STATUS` maps its code).
"""

from __future__ import annotations

from typing import Any, TypeVar

import falcon
import msgspec

from actors.http.reply import REQUEST_ID, Gateway
from actors.http.schemas import (
    ApiError,
    BatchIn,
    BatchOut,
    CancelledOut,
    ClaimIn,
    ClaimOut,
    HeartbeatIn,
    OkOut,
    QueryIn,
    QueryOut,
    ResultIn,
    SubmittedOut,
    TaskIn,
    TaskOut,
    WorkersOut,
    assignment_out,
    bytes_of,
    task_out,
    task_spec,
)
from transport.messages import (
    Assigned,
    Cancel,
    Claim,
    Error,
    ErrorCode,
    Heartbeat,
    Message,
    Ok,
    Result,
    Stats,
    StatsInfo,
    StatsReply,
    Status,
    Submit,
    SubmitBatch,
    Submitted,
    SubmittedBatch,
    TaskStatus,
    WorkerList,
    Workers,
)

T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def read_body(req: falcon.Request, kind: type[T], limit: int) -> tuple[T, int]:
    """The request body decoded as `kind`, and its size; 413 past `limit` bytes, 400 naming the field."""
    if req.content_length is not None and req.content_length > limit:
        raise ApiError(ErrorCode.FRAME_TOO_LARGE, f"request body of {req.content_length} bytes is over the "
                                                  f"limit of {limit} (broker.max_frame_bytes); send less")
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise ApiError(ErrorCode.FRAME_TOO_LARGE, f"request body is over the limit of {limit} bytes "
                                                  "(broker.max_frame_bytes); send less")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data), len(data)
    except msgspec.ValidationError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"request body is not JSON: {exc}") from None


def send(resp: falcon.Response, body: Any, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _encode(body)


def expect(answer: Message, kind: type[T]) -> T:
    """The answer if it is a `kind`; an actor's Error becomes an ApiError with its code and message."""
    if isinstance(answer, kind):
        return answer
    if isinstance(answer, Error):
        raise ApiError(answer.code, answer.message)
    raise ApiError(ErrorCode.INTERNAL, f"unexpected answer {type(answer).__name__}; see the broker log")


class Api:
    """What every resource shares: the gateway, the body limit, the query function."""

    def __init__(self, gateway: Gateway, body_limit: int, query: Any) -> None:
        self.gateway = gateway
        self.body_limit = body_limit
        self.query = query

    def stats(self) -> StatsInfo:
        return expect(self.gateway.registry(Stats(id=REQUEST_ID)), StatsReply).stats

    def status(self, task_id: str) -> TaskOut:
        _check_id(task_id)
        return task_out(expect(self.gateway.queue(Status(id=REQUEST_ID, task_id=task_id)), TaskStatus).task)

    def cancel(self, task_id: str) -> CancelledOut:
        _check_id(task_id)
        expect(self.gateway.queue(Cancel(id=REQUEST_ID, task_id=task_id)), Ok)
        return CancelledOut(task_id=task_id, state="cancelled")


def _check_id(value: str, field: str = "task_id") -> None:
    if not 1 <= len(value) <= 200:
        raise ApiError(ErrorCode.BAD_REQUEST, f"{field} must be 1-200 characters")


class TasksResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, size = read_body(req, TaskIn, self.api.body_limit)
        answer = self.api.gateway.queue(Submit(id=REQUEST_ID, task=task_spec(body)), size)
        done = expect(answer, Submitted)
        send(resp, SubmittedOut(task_id=done.task_id, duplicate=done.duplicate), 200 if done.duplicate else 201)


class BatchResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, size = read_body(req, BatchIn, self.api.body_limit)
        specs = [task_spec(task) for task in body.tasks]
        done = expect(self.api.gateway.queue(SubmitBatch(id=REQUEST_ID, tasks=specs), size), SubmittedBatch)
        send(resp, BatchOut(task_ids=done.task_ids), 201)


class TaskResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        send(resp, self.api.status(task_id))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        send(resp, self.api.cancel(task_id))


class StatsResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, self.api.stats())


class WorkersResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        answer = expect(self.api.gateway.registry(Workers(id=REQUEST_ID)), WorkerList)
        send(resp, WorkersOut(workers=answer.workers))


class QueryResource:
    reads_only = True  # a read-only key may run it: QUERY refuses anything but a read

    def __init__(self, api: Api) -> None:
        self.api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, _ = read_body(req, QueryIn, self.api.body_limit)
        send(resp, run_query(self.api.query, body.sql))


def run_query(query: Any, sql: str) -> QueryOut:
    """QUERY's rules (read-only, one statement, 10,000 rows, timeout), its errors as ApiError."""
    try:
        result = query(sql)
    except Exception as exc:  # QueryRefused / QueryTimeout / no history: all user-facing text
        code = getattr(exc, "code", ErrorCode.BAD_REQUEST)
        raise ApiError(code, getattr(exc, "message", None) or str(exc)) from None
    return QueryOut(columns=result.columns, rows=result.rows, truncated=result.truncated)


class ClaimResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, size = read_body(req, ClaimIn, self.api.body_limit)
        claim = Claim(id=REQUEST_ID, worker_id=body.worker_id, queues=body.queues, max_tasks=body.max_tasks,
                      wait_ms=body.wait_ms)
        answer = expect(self.api.gateway.queue(claim, size), Assigned)
        send(resp, ClaimOut(tasks=[assignment_out(a) for a in answer.tasks]))


class ResultResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        _check_id(task_id)
        body, size = read_body(req, ResultIn, self.api.body_limit)
        result = Result(id=REQUEST_ID, worker_id=body.worker_id, task_id=task_id, ok=body.ok,
                        result=bytes_of(body.result, body.result_base64, "result"), error=body.error,
                        retry=body.retry)
        expect(self.api.gateway.queue(result, size), Ok)
        send(resp, OkOut())


class HeartbeatResource:
    def __init__(self, api: Api) -> None:
        self.api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response, worker_id: str) -> None:
        _check_id(worker_id, "worker_id")
        body, _ = read_body(req, HeartbeatIn, self.api.body_limit)
        beat = Heartbeat(id=REQUEST_ID, worker_id=worker_id, active=body.active, cpu_percent=body.cpu_percent,
                         memory_bytes=body.memory_bytes)
        expect(self.api.gateway.registry(beat), Ok)
        send(resp, OkOut())
