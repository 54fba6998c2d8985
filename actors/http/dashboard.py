"""The web dashboard: server-rendered Jinja2 pages over the same `Api` the REST routes use.

Every page reads through the actors (STATS, WORKERS, STATUS via the `Gateway`) or the read-only
history query; every change is a POST (the `Guard` checks its origin) and answers with a redirect.
Pages are bounded: lists are paged (`PAGE_ROWS`), charts aggregate in DuckDB. A page asked with
`?partial=1` renders only its live part, which `static/refresh.js` swaps in every few seconds.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import falcon
import jinja2
import msgspec
from markupsafe import Markup
from msgspec import UNSET

from actors.context import BrokerContext
from actors.http import charts as charts_svg
from actors.http.api import Api, expect, run_query
from actors.http.guard import COOKIE, Guard
from actors.http.reply import REQUEST_ID
from actors.http.schemas import ApiError
from transport.messages import ErrorCode, WorkerList, Workers

PAGE_ROWS = 50
MAX_PAGE = 10_000
CHART_MINUTES = 60
CHART_TTL_S = 10.0  # the overview's charts are reused this long (the page refreshes every 3 s)
REFRESH_MS = 3000

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          autoescape=True, trim_blocks=True, lstrip_blocks=True)
_env.filters["when"] = lambda t: "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def sql_text(value: str) -> str:
    """A SQL string literal of `value` (quotes doubled); values are length-bounded by the caller."""
    return "'" + value.replace("'", "''") + "'"


def utc_text(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


def read_form(req: falcon.Request, limit: int) -> dict[str, str]:
    """An urlencoded form body, at most `limit` bytes (413 past it); the first value of each field."""
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise ApiError(ErrorCode.FRAME_TOO_LARGE, f"form over {limit} bytes (broker.max_frame_bytes); send less")
    fields = parse_qs(data.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


class Page:
    """Base of every dashboard resource: rendering, paging and the form helpers."""

    dashboard = True
    template = ""

    def __init__(self, api: Api, ctx: BrokerContext) -> None:
        self.api = api
        self.ctx = ctx

    def render(self, req: falcon.Request, resp: falcon.Response, status: int = 200, **values: Any) -> None:
        partial = req.get_param_as_bool("partial") or False
        resp.status = status
        resp.content_type = falcon.MEDIA_HTML
        resp.text = _env.get_template(self.template).render(
            partial=partial, path=req.path, role=getattr(req.context, "role", None),
            auth=self.ctx.settings.auth.enabled, refresh_ms=REFRESH_MS, **values)

    @staticmethod
    def page(req: falcon.Request) -> int:
        return req.get_param_as_int("page", min_value=0, max_value=MAX_PAGE, default=0) or 0


class Overview(Page):
    """Live counts (STATS, every time) and two charts over the last hour of history, recomputed at most
    every CHART_TTL_S: they aggregate up to the whole hour's rows, and their resolution is a minute."""

    template = "overview.html"

    def __init__(self, api: Api, ctx: BrokerContext) -> None:
        super().__init__(api, ctx)
        self._charts: tuple[float, Markup, Markup] | None = None  # (computed at, throughput, runtimes)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        throughput, runtimes = self.charts(time.time())
        self.render(req, resp, stats=self.api.stats(), minutes=CHART_MINUTES, throughput=throughput,
                    runtimes=runtimes)

    def charts(self, now: float) -> tuple[Markup, Markup]:
        cached = self._charts
        if cached is not None and 0 <= now - cached[0] < CHART_TTL_S:
            return cached[1], cached[2]
        since = utc_text(now - CHART_MINUTES * 60)
        flow = run_query(self.api.query, (
            "SELECT CAST(epoch(date_trunc('minute', finished_at)) // 60 AS BIGINT) AS minute, "
            "count(*) FILTER (WHERE state = 'completed'), count(*) FILTER (WHERE state = 'failed') "
            f"FROM task_history WHERE finished_at >= TIMESTAMP '{since}' GROUP BY 1"))
        runtimes = run_query(self.api.query, (
            "SELECT kind, quantile_cont(duration_ms, 0.5), quantile_cont(duration_ms, 0.99), count(*) "
            f"FROM task_history WHERE finished_at >= TIMESTAMP '{since}' AND duration_ms IS NOT NULL "
            "GROUP BY kind ORDER BY 3 DESC LIMIT 15"))
        charts = (Markup(charts_svg.throughput_svg(flow.rows, CHART_MINUTES, int(now // 60))),
                  Markup(charts_svg.runtime_svg(runtimes.rows)))
        self._charts = (now, *charts)
        return charts


class TaskPage(Page):
    template = "task.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        try:
            task = self.api.status(task_id)
        except ApiError as exc:
            self.render(req, resp, status=404 if exc.code == ErrorCode.NOT_FOUND else 400, task=None,
                        task_id=task_id, error=exc.message)
            return
        self.render(req, resp, task=task, task_id=task_id, error=req.get_param("error"), result=result_text(task))


def result_text(task: Any) -> str:
    """A task's result for display: its JSON text, `base64: ...` for other bytes, or nothing."""
    if task.result is not UNSET:
        return msgspec.json.encode(task.result).decode()
    if task.result_base64 is not UNSET:
        return f"base64: {task.result_base64}"
    return ""


class CancelAction(Page):
    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        target = f"/tasks/{quote(task_id, safe='')}"
        try:
            self.api.cancel(task_id)
        except ApiError as exc:
            target += "?error=" + quote(exc.message[:300])
        raise falcon.HTTPSeeOther(target)


class Running(Page):
    """Running tasks by worker, a page at a time; each row's start from STATUS."""

    template = "running.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        workers = workers_of(self.api)
        pairs = [(w, task_id) for w in workers for task_id in w.running]
        page = self.page(req)
        rows = []
        for worker, task_id in pairs[page * PAGE_ROWS:(page + 1) * PAGE_ROWS]:
            try:
                rows.append((worker, self.api.status(task_id)))
            except ApiError:
                continue  # finished since the worker list was taken
        self.render(req, resp, rows=rows, page=page, more=len(pairs) > (page + 1) * PAGE_ROWS, total=len(pairs))


def workers_of(api: Api) -> list[Any]:
    """The WORKERS answer, as GET /api/v1/workers gets it."""
    return expect(api.gateway.registry(Workers(id=REQUEST_ID)), WorkerList).workers


class WorkersPage(Page):
    template = "workers.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        workers = sorted(workers_of(self.api), key=lambda w: (not w.alive, w.worker_id))
        page = self.page(req)
        self.render(req, resp, workers=workers[page * PAGE_ROWS:(page + 1) * PAGE_ROWS], page=page,
                    more=len(workers) > (page + 1) * PAGE_ROWS, now=time.time())


class Sql(Page):
    """SQL over task_history: results as a table, or as CSV (`format=csv`)."""

    template = "sql.html"
    reads_only = True
    EXAMPLE = "SELECT queue, state, count(*) AS tasks FROM task_history GROUP BY ALL ORDER BY 1, 2"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.render(req, resp, sql=self.EXAMPLE, result=None, error=None)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        form = read_form(req, self.api.body_limit)
        sql = str(form.get("sql", ""))[:100_000]
        try:
            result = run_query(self.api.query, sql)
        except ApiError as exc:
            self.render(req, resp, status=400, sql=sql, result=None, error=exc.message)
            return
        if form.get("format") == "csv":
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(result.columns)
            writer.writerows(result.rows)
            resp.content_type = "text/csv; charset=utf-8"
            resp.downloadable_as = "query.csv"
            resp.text = out.getvalue()
            return
        self.render(req, resp, sql=sql, result=result, error=None)


class Login(Page):
    """Takes an API key and keeps it in an HttpOnly, SameSite=Strict cookie (Secure under TLS)."""

    template = "login.html"
    public = True

    def __init__(self, api: Api, ctx: BrokerContext, guard: Guard) -> None:
        super().__init__(api, ctx)
        self.guard = guard

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.render(req, resp, error=None)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        form = read_form(req, self.api.body_limit)
        key = str(form.get("api_key", ""))[:4096]
        keys, read_only = self.ctx.keys, self.guard.read_only
        if not key or not (keys.accepts(key) or read_only.accepts(key)):
            self.render(req, resp, status=401, error="that key is not in auth.api_keys or auth.read_only_api_keys")
            return
        resp.set_cookie(COOKIE, key, http_only=True, same_site="Strict", path="/",
                        secure=self.ctx.settings.api.enable_tls)
        raise falcon.HTTPSeeOther("/")


class Logout(Page):
    public = True

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.unset_cookie(COOKIE, path="/")
        raise falcon.HTTPSeeOther("/login")


def mount(app: falcon.App, api: Api, ctx: BrokerContext, guard: Guard) -> None:
    """The dashboard's route table; the queue-operation pages (/queues, /tasks, /dead, /schedules) are in
    `actors.http.dashboard_ops.mount`."""
    app.add_route("/", Overview(api, ctx))
    app.add_route("/tasks/{task_id}", TaskPage(api, ctx))
    app.add_route("/tasks/{task_id}/cancel", CancelAction(api, ctx))
    app.add_route("/running", Running(api, ctx))
    app.add_route("/workers", WorkersPage(api, ctx))
    app.add_route("/sql", Sql(api, ctx))
    app.add_route("/login", Login(api, ctx, guard))
    app.add_route("/logout", Logout(api, ctx))
