"""The queue-operation routes of /api/v1 (protocol 1.1 messages, docs/protocol.md "Version 1.1"): pause,
resume, purge, rate limits, the dead set, browsing tasks by state, cron schedules.

Like `actors.http.api`, every handler sends the message a TCP client would send to the same owner (the
queue actor) through the `Gateway`; a BROWSE of a terminal state reads task_history through the gated
query function, exactly as a TCP connection does (`actors.browse_history.history_page`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import falcon
import msgspec

from actors.browse_history import history_page
from actors.http import api as api_module
from actors.http.api import Api, expect, read_body, send
from actors.http.reply import REQUEST_ID
from actors.http.schemas import ApiError, OkOut, task_out, task_spec
from actors.http.schemas_ops import (
    CountOut,
    DeadIn,
    DeadPageOut,
    PurgeIn,
    QueueOut,
    QueuesOut,
    RateLimitIn,
    ScheduleIn,
    ScheduleOut,
    SchedulesOut,
    TaskPageOut,
)
from transport.messages import ErrorCode, Message, Ok
from transport.messages_ops import (
    HISTORY_STATES,
    Browse,
    Count,
    DeadList,
    DeadPage,
    DeleteDead,
    Pause,
    Purge,
    QueueList,
    Queues,
    RateLimit,
    Requeue,
    Resume,
    ScheduleAdd,
    ScheduleList,
    ScheduleRemove,
    Schedules,
    TaskPage,
)

M = TypeVar("M")


def build(message: type[M], /, **fields: Any) -> M:
    """The request message with every bound of `transport.messages_ops` checked (400 naming the field)."""
    try:
        return msgspec.convert({"id": REQUEST_ID, **fields}, message, from_attributes=True)
    except msgspec.ValidationError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"invalid request: {exc}") from None


def ask(api: Api, request: Message, answer: type[M]) -> M:
    return expect(api.gateway.queue(request), answer)


def queues_out(api: Api) -> QueuesOut:
    """STATS' per-tier counts joined with QUEUES' dead counts, pause flags and rate limits, by queue name."""
    live = api.stats().queues
    settings = {q.name: q for q in ask(api, build(Queues), QueueList).queues}
    out: dict[str, QueueOut] = {}
    for name in sorted(set(live) | set(settings)):
        counts, info = live.get(name), settings.get(name)
        fields = msgspec.structs.asdict(counts) if counts else {}
        if info is not None:
            fields.update(dead=info.dead, paused=info.paused, rate_limit=info.rate_limit)
            if counts is None:
                fields.update(pending=info.pending, scheduled=info.scheduled, running=info.running)
        out[name] = QueueOut(**fields)
    return QueuesOut(queues=out)


def browse(api: Api, **fields: Any) -> TaskPageOut:
    """A page of tasks in one state: live states from the queue actor, terminal ones from task_history."""
    req = build(Browse, **fields)
    if req.state in HISTORY_STATES:
        try:
            answer = history_page(api.query, req)
        except Exception as exc:  # QueryRefused / QueryTimeout / no history: all user-facing text
            code = getattr(exc, "code", ErrorCode.BAD_REQUEST)
            raise ApiError(code, getattr(exc, "message", None) or str(exc)) from None
        page = expect(answer, TaskPage)
    else:
        page = ask(api, req, TaskPage)
    return TaskPageOut(tasks=[task_out(t) for t in page.tasks], next=page.next)


def dead_page(api: Api, **fields: Any) -> DeadPageOut:
    page = ask(api, build(DeadList, **fields), DeadPage)
    return DeadPageOut(tasks=[task_out(t) for t in page.tasks], next=page.next)


def dead_change(api: Api, message: type[Requeue] | type[DeleteDead], body: DeadIn) -> CountOut:
    """REQUEUE or DELETE_DEAD of one task or all matching; 400 unless exactly one of the two is asked."""
    if (body.task_id is None) == (not body.all):
        raise ApiError(ErrorCode.BAD_REQUEST, 'give "task_id" or "all": true (with optional "queue", "kind"), '
                                              "not both and not neither")
    return CountOut(count=ask(api, build(message, **msgspec.structs.asdict(body)), Count).count)


def schedule_put(api: Api, name: str, body: ScheduleIn) -> ScheduleOut:
    if body.task.run_at is not None or body.task.delay_ms is not None:
        raise ApiError(ErrorCode.BAD_REQUEST, "a schedule's task takes no run_at or delay_ms: the cron "
                                              "expression says when it runs")
    add = build(ScheduleAdd, name=name, cron=body.cron, task=task_spec(body.task), tz=body.tz, enabled=body.enabled)
    expect(api.gateway.queue(add), Ok)
    return ScheduleOut(name=name)


def _params(req: falcon.Request, names: tuple[str, ...]) -> dict[str, Any]:
    """The query parameters given (others absent), as strings; `limit`/`after` as integers (400 if not)."""
    out: dict[str, Any] = {}
    for name in names:
        value = req.get_param(name)
        if value is None or value == "":
            continue
        if name in ("limit", "after"):
            if not value.isdigit():
                raise ApiError(ErrorCode.BAD_REQUEST, f"{name} must be a whole number, not {value[:40]!r}")
            out[name] = int(value[:12])
        else:
            out[name] = value
    return out


class Resource:
    def __init__(self, api: Api) -> None:
        self.api = api


class QueuesResource(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, queues_out(self.api))


class PauseResource(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response, queue: str) -> None:
        expect(self.api.gateway.queue(build(Pause, queue=queue)), Ok)
        send(resp, OkOut())


class ResumeResource(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response, queue: str) -> None:
        expect(self.api.gateway.queue(build(Resume, queue=queue)), Ok)
        send(resp, OkOut())


class PurgeResource(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response, queue: str) -> None:
        has_body = bool(req.content_length) or req.get_header("Transfer-Encoding") is not None
        body, _ = read_body(req, PurgeIn, self.api.body_limit) if has_body else (PurgeIn(), 0)  # a body is optional
        send(resp, CountOut(count=ask(self.api, build(Purge, queue=queue, scheduled=body.scheduled), Count).count))


class RateLimitResource(Resource):
    def on_put(self, req: falcon.Request, resp: falcon.Response, queue: str) -> None:
        body, _ = read_body(req, RateLimitIn, self.api.body_limit)
        expect(self.api.gateway.queue(build(RateLimit, queue=queue, per_second=body.per_second)), Ok)
        send(resp, OkOut())


class TasksResource(api_module.TasksResource):
    """/api/v1/tasks: POST submits (`actors.http.api.TasksResource`), GET browses one state."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        fields = _params(req, ("state", "queue", "kind", "limit", "cursor"))
        if "state" not in fields:
            raise ApiError(ErrorCode.BAD_REQUEST, "state is required: one of scheduled, pending, running, dead, "
                                                  "completed, failed, cancelled")
        order = req.get_param("order") or "oldest"
        if order not in ("oldest", "newest"):
            raise ApiError(ErrorCode.BAD_REQUEST, f"order must be oldest or newest, not {order[:40]!r}")
        send(resp, browse(self.api, newest_first=order == "newest", **fields))


class DeadResource(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, dead_page(self.api, **_params(req, ("queue", "kind", "limit", "after"))))


class RequeueResource(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, _ = read_body(req, DeadIn, self.api.body_limit)
        send(resp, dead_change(self.api, Requeue, body))


class DeleteDeadResource(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, _ = read_body(req, DeadIn, self.api.body_limit)
        send(resp, dead_change(self.api, DeleteDead, body))


class SchedulesResource(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, SchedulesOut(schedules=ask(self.api, build(Schedules), ScheduleList).schedules))


class ScheduleResource(Resource):
    def on_put(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        body, _ = read_body(req, ScheduleIn, self.api.body_limit)
        send(resp, schedule_put(self.api, name, body))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        expect(self.api.gateway.queue(build(ScheduleRemove, name=name)), Ok)
        send(resp, ScheduleOut(name=name))
