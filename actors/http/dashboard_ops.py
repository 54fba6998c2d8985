"""Dashboard pages and actions for the queue operations: queues (pause, resume, purge, rate limit), tasks
by state with cursor paging, the dead set, cron schedules, and a dead task's requeue button.

Pages read through `actors.http.ops` (the same messages as /api/v1); every action is a POST (the `Guard`
checks its origin and the key's role) that answers with a redirect, carrying an `error` to show on failure.
Lists are one page of at most PAGE_ROWS tasks, never the whole queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import falcon
import msgspec

from actors.http import ops
from actors.http.api import expect
from actors.http.dashboard import PAGE_ROWS, Page, read_form
from actors.http.schemas import ApiError, TaskIn
from actors.http.schemas_ops import DeadIn, ScheduleIn
from transport.messages import ErrorCode, Ok
from transport.messages_ops import (
    Count,
    DeleteDead,
    Pause,
    Purge,
    RateLimit,
    Requeue,
    Resume,
    ScheduleList,
    ScheduleRemove,
    Schedules,
)

STATES = ("pending", "scheduled", "running", "dead", "failed", "completed", "cancelled")
FILTERS = ("queue", "kind")


def _filters(req: falcon.Request) -> dict[str, str]:
    return {name: (req.get_param(name) or "").strip()[:200] for name in FILTERS}


def _given(values: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in values.items() if value}


def redirect(target: str, error: str | None = None) -> None:
    """Answers 303 to `target`, with `error` as a query parameter the page shows."""
    if error:
        target += ("&" if "?" in target else "?") + "error=" + quote(error[:300])
    raise falcon.HTTPSeeOther(target)


def act(target: str, change: Callable[[], Any]) -> None:
    """Runs one change and redirects to `target`; a refused change comes back as the page's error line."""
    try:
        change()
    except ApiError as exc:
        redirect(target, exc.message)
    redirect(target)


class QueuesPage(Page):
    """Every queue with its live counts, dead tasks, pause flag and rate limit, and the forms that change them."""

    template = "queues.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        queues = ops.queues_out(self.api).queues
        names = sorted(queues)
        page = self.page(req)
        shown = names[page * PAGE_ROWS:(page + 1) * PAGE_ROWS]
        self.render(req, resp, queues=[(n, queues[n]) for n in shown], page=page, error=req.get_param("error"),
                    more=len(names) > (page + 1) * PAGE_ROWS)


class QueueAction(Page):
    """POST /queues/{queue}/{action}: pause, resume, purge (form field `scheduled`), rate-limit (`per_second`,
    empty clears it)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, queue: str, action: str) -> None:
        form = read_form(req, self.api.body_limit)
        act("/queues", lambda: self.change(queue, action, form))

    def change(self, queue: str, action: str, form: dict[str, str]) -> None:
        gateway = self.api.gateway
        if action == "pause":
            expect(gateway.queue(ops.build(Pause, queue=queue)), Ok)
        elif action == "resume":
            expect(gateway.queue(ops.build(Resume, queue=queue)), Ok)
        elif action == "purge":
            ops.ask(self.api, ops.build(Purge, queue=queue, scheduled=form.get("scheduled") == "on"), Count)
        elif action == "rate-limit":
            expect(gateway.queue(ops.build(RateLimit, queue=queue, per_second=_rate(form))), Ok)
        else:
            raise falcon.HTTPNotFound()


def _rate(form: dict[str, str]) -> float | None:
    text = form.get("per_second", "").strip()
    if not text:
        return None
    try:
        return float(text[:40])
    except ValueError:
        raise ApiError(ErrorCode.BAD_REQUEST, f"rate limit {text[:40]!r} is not a number of claims per second; "
                                              "leave it empty to clear the limit") from None


class TasksPage(Page):
    """One state's tasks, filtered by queue and kind, a page at a time (the `cursor` of the previous page);
    a task id jumps to its page."""

    template = "tasks.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        task_id = (req.get_param("task_id") or "").strip()
        if task_id:
            raise falcon.HTTPSeeOther(f"/tasks/{quote(task_id[:200], safe='')}")
        state = req.get_param("state") or "pending"
        filters = _filters(req)
        newest = req.get_param("order") == "newest"
        cursor = (req.get_param("cursor") or "")[:400] or None
        page, error = None, req.get_param("error")
        try:
            page = ops.browse(self.api, state=state, limit=PAGE_ROWS, cursor=cursor, newest_first=newest,
                              **_given(filters))
        except ApiError as exc:
            error = exc.message
        args = {"state": state, **_given(filters), **({"order": "newest"} if newest else {})}
        next_link = f"/tasks?{urlencode({**args, 'cursor': page.next})}" if page and page.next else None
        self.render(req, resp, status=200 if page else 400, page=page, state=state, states=STATES,
                    filters=filters, newest=newest, first_link=f"/tasks?{urlencode(args)}" if cursor else None,
                    next_link=next_link, error=error)


class DeadPage(Page):
    """The dead set, oldest death first, a page at a time (`after`), with requeue and delete, one or all."""

    template = "dead.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        filters = _filters(req)
        after = req.get_param_as_int("after", min_value=0)
        page, error = None, req.get_param("error")
        try:
            page = ops.dead_page(self.api, limit=PAGE_ROWS, after=after, **_given(filters))
        except ApiError as exc:
            error = exc.message
        args = _given(filters)
        next_link = f"/dead?{urlencode({**args, 'after': page.next})}" if page and page.next is not None else None
        self.render(req, resp, page=page, filters=filters, error=error, next_link=next_link,
                    first_link=f"/dead?{urlencode(args)}" if after is not None else None,
                    filter_args=urlencode(args))


class DeadAction(Page):
    """POST /dead/{action} (requeue, delete): form `task_id`, or `all` with the optional `queue` and `kind`."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, action: str) -> None:
        form = read_form(req, self.api.body_limit)
        kinds: dict[str, type[Requeue] | type[DeleteDead]] = {"requeue": Requeue, "delete": DeleteDead}
        message = kinds.get(action)
        if message is None:
            raise falcon.HTTPNotFound()
        back = form.get("back", "")
        local = back.startswith("/") and not back.startswith(("//", "/\\")) and len(back) <= 1000
        target = back if local else "/dead"  # only a path of this site: never a redirect elsewhere
        fields = {k: v.strip() for k, v in form.items() if k in ("task_id", "queue", "kind") and v.strip()}
        act(target, lambda: ops.dead_change(self.api, message, msgspec.convert(
            {**fields, "all": form.get("all") == "on"}, DeadIn)))


class SchedulesPage(Page):
    template = "schedules.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        answer = ops.ask(self.api, ops.build(Schedules), ScheduleList)
        self.render(req, resp, schedules=sorted(answer.schedules, key=lambda s: s.name),
                    error=req.get_param("error"))


class ScheduleAction(Page):
    """POST /schedules (add or replace, from the form) and POST /schedules/{name}/delete."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str | None = None) -> None:
        form = read_form(req, self.api.body_limit)
        if name is not None:
            act("/schedules", lambda: expect(self.api.gateway.queue(ops.build(ScheduleRemove, name=name)), Ok))
        act("/schedules", lambda: ops.schedule_put(self.api, form.get("name", "").strip(), _schedule(form)))


def _schedule(form: dict[str, str]) -> ScheduleIn:
    """The add form as a ScheduleIn (every bound checked); `payload` is JSON text, empty for none."""
    task: dict[str, Any] = {"kind": form.get("kind", "").strip(), "queue": form.get("queue", "").strip() or "default",
                            "priority": form.get("priority") or "normal"}
    payload = form.get("payload", "").strip()
    try:
        if payload:
            task["payload"] = msgspec.Raw(msgspec.json.encode(msgspec.json.decode(payload)))
        body = {"cron": form.get("cron", "").strip(), "tz": form.get("tz", "").strip() or "UTC",
                "enabled": form.get("enabled") == "on", "task": msgspec.convert(task, TaskIn)}
        return msgspec.convert(body, ScheduleIn, from_attributes=True)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"invalid schedule: {exc}") from None


class RequeueAction(Page):
    """POST /tasks/{task_id}/requeue: the task page's button for a dead task."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        target = f"/tasks/{quote(task_id, safe='')}"
        act(target, lambda: ops.dead_change(self.api, Requeue, DeadIn(task_id=task_id[:200])))


def mount(app: falcon.App, api: Any, ctx: Any) -> None:
    """The queue-operation pages' route table (after `actors.http.dashboard.mount`, whose /queues and /tasks
    these replace)."""
    app.add_route("/queues", QueuesPage(api, ctx))
    app.add_route("/queues/{queue}/{action}", QueueAction(api, ctx))
    app.add_route("/tasks", TasksPage(api, ctx))
    app.add_route("/tasks/{task_id}/requeue", RequeueAction(api, ctx))
    app.add_route("/dead", DeadPage(api, ctx))
    app.add_route("/dead/{action}", DeadAction(api, ctx))
    app.add_route("/schedules", SchedulesPage(api, ctx))
    app.add_route("/schedules/add", ScheduleAction(api, ctx))
    app.add_route("/schedules/{name}/delete", ScheduleAction(api, ctx))
