"""The HTTP server's route table (read it top to bottom), the Falcon app, and its gevent WSGIServer.

`API_ROUTES` is the one list of /api/v1 routes: `build_app` mounts it and `actors.http.openapi`
documents it, so the document cannot miss a route. The dashboard's pages are in
`actors.http.dashboard.PAGES`.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import falcon
import msgspec
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from actors.context import BrokerContext
from actors.http import api, dashboard, dashboard_ops, errors, ops
from actors.http.guard import Guard
from actors.http.openapi import Operation, document
from actors.http.reply import Gateway
from actors.http.schemas import (
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
)
from actors.http.schemas_ops import (
    CountOut,
    DeadIn,
    DeadPageOut,
    PurgeIn,
    QueuesOut,
    RateLimitIn,
    ScheduleIn,
    ScheduleOut,
    SchedulesOut,
    TaskPageOut,
)
from transport.messages import StatsInfo

log = logging.getLogger("tqbroker.http")

STATIC_DIR = Path(__file__).parent / "static"
OPENAPI_PATH = "/api/v1/openapi.json"

API_ROUTES: list[tuple[str, Any, dict[str, Operation]]] = [
    ("/api/v1/tasks", ops.TasksResource, {
        "POST": Operation("Submit one task (201; 200 with duplicate: true)", SubmittedOut, 201, TaskIn),
        "GET": Operation("A page of tasks in one state (required: state), oldest first unless order=newest; "
                         "pass `next` as cursor for the following page", TaskPageOut,
                         params=("state", "queue", "kind", "limit", "cursor", "order"), required=("state",))}),
    ("/api/v1/tasks/batch", api.BatchResource, {
        "POST": Operation("Submit 1-10,000 tasks, accepted whole or not at all", BatchOut, 201, BatchIn)}),
    ("/api/v1/tasks/{task_id}", api.TaskResource, {
        "GET": Operation("A task's status, result and error", TaskOut),
        "DELETE": Operation("Cancel a pending or scheduled task", CancelledOut)}),
    ("/api/v1/tasks/{task_id}/result", api.ResultResource, {
        "POST": Operation("Report the outcome of a claimed task", OkOut, 200, ResultIn)}),
    ("/api/v1/stats", api.StatsResource, {"GET": Operation("Counts, totals and per-queue figures", StatsInfo)}),
    ("/api/v1/queues", ops.QueuesResource, {
        "GET": Operation("Per queue: live counts and tiers, dead tasks, paused, rate limit", QueuesOut)}),
    ("/api/v1/queues/{queue}/pause", ops.PauseResource, {
        "POST": Operation("Pause: claims get nothing from this queue until resumed", OkOut)}),
    ("/api/v1/queues/{queue}/resume", ops.ResumeResource, {"POST": Operation("Resume a paused queue", OkOut)}),
    ("/api/v1/queues/{queue}/purge", ops.PurgeResource, {
        "POST": Operation("Delete the queue's pending tasks (and scheduled ones with scheduled: true)", CountOut,
                          request=PurgeIn)}),
    ("/api/v1/queues/{queue}/rate-limit", ops.RateLimitResource, {
        "PUT": Operation("Set claims per second for the queue; per_second: null clears it", OkOut,
                         request=RateLimitIn)}),
    ("/api/v1/dead", ops.DeadResource, {
        "GET": Operation("A page of the dead set, oldest death first; pass `next` as after", DeadPageOut,
                         params=("queue", "kind", "limit", "after"))}),
    ("/api/v1/dead/requeue", ops.RequeueResource, {
        "POST": Operation("Dead tasks back to pending under the same id: task_id, or all (queue, kind)", CountOut,
                          request=DeadIn)}),
    ("/api/v1/dead/delete", ops.DeleteDeadResource, {
        "POST": Operation("Delete dead tasks: task_id, or all (queue, kind)", CountOut, request=DeadIn)}),
    ("/api/v1/schedules", ops.SchedulesResource, {"GET": Operation("The cron schedules", SchedulesOut)}),
    ("/api/v1/schedules/{name}", ops.ScheduleResource, {
        "PUT": Operation("Add or replace the named cron schedule", ScheduleOut, request=ScheduleIn),
        "DELETE": Operation("Remove the named cron schedule", ScheduleOut)}),
    ("/api/v1/workers", api.WorkersResource, {"GET": Operation("Registered workers", WorkersOut)}),
    ("/api/v1/workers/{worker_id}/heartbeat", api.HeartbeatResource, {
        "POST": Operation("Heartbeat: renews the leases of the active tasks", OkOut, 200, HeartbeatIn)}),
    ("/api/v1/claim", api.ClaimResource, {
        "POST": Operation("Claim tasks, waiting up to wait_ms for work", ClaimOut, 200, ClaimIn)}),
    ("/api/v1/query", api.QueryResource, {
        "POST": Operation("One read-only SQL statement over task_history", QueryOut, 200, QueryIn)}),
]


class OpenApiResource:
    """GET /api/v1/openapi.json: the document, built once at start."""

    public = True

    def __init__(self, body: bytes) -> None:
        self.body = body

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.body


def openapi_document(version: str = "1.1") -> dict[str, Any]:
    routes = [(path, ops) for path, _, ops in API_ROUTES]
    routes.append((OPENAPI_PATH, {"GET": Operation("This document (OpenAPI 3.1)", dict)}))
    return document(routes, version)


def gated(ctx: BrokerContext, query: Any) -> Any:
    """`query` behind the broker-wide QUERY gate (`actors.queries.QueryGate`), one slot per call: SQL from
    HTTP waits in the same line as TCP clients' QUERYs and history BROWSEs."""

    def run(sql: str) -> Any:
        with ctx.queries.slot(object()):
            return query(sql)

    return run


def build_app(ctx: BrokerContext, query: Any) -> falcon.App:
    guard = Guard(ctx)
    query = gated(ctx, query)
    app = falcon.App(middleware=[guard])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    shared = api.Api(Gateway(ctx), ctx.settings.broker.max_frame_bytes, query)
    for path, resource, _ in API_ROUTES:
        app.add_route(path, resource(shared))
    app.add_route(OPENAPI_PATH, OpenApiResource(msgspec.json.encode(openapi_document())))
    dashboard.mount(app, shared, ctx, guard)
    dashboard_ops.mount(app, shared, ctx)
    app.add_static_route("/static", str(STATIC_DIR))
    return app


class RestHandler(WSGIHandler):
    """gevent's handler, but a response's head and its first body chunk leave in ONE send.

    gevent writes the status line and headers with one `sendall` and the body with another; with
    TCP_NODELAY (which `RestServer` needs, else the body waits for the client's delayed ACK) that is two
    packets and two wake-ups of the client per response. Bodies over COMBINE_LIMIT go separately.
    """

    COMBINE_LIMIT = 256 * 1024
    _held: bytearray | None = None
    _holding = False

    def _write_with_headers(self, data: bytes) -> None:
        self._holding = len(data) <= self.COMBINE_LIMIT
        try:
            super()._write_with_headers(data)
        finally:
            held, self._held, self._holding = self._held, None, False
            if held is not None:  # an empty first chunk: the head goes alone
                super()._sendall(held)

    def _sendall(self, data: bytes) -> None:
        if not self._holding:
            super()._sendall(data)
        elif self._held is None:
            self._held = bytearray(data)  # the head: wait for the body
        else:
            head, self._held, self._holding = self._held, None, False
            head += data
            super()._sendall(head)


class RestServer(WSGIServer):
    """gevent's WSGIServer with TCP_NODELAY on every connection (a reply's bytes leave at once instead of
    waiting, by Nagle, for the client's delayed ACK) and an idle timeout on every socket read or write."""

    idle_timeout_s = 30.0

    def handle(self, sock: socket.socket, address: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        sock.settimeout(self.idle_timeout_s)
        super().handle(sock, address)


def start_server(ctx: BrokerContext, query: Any, ssl_context: ssl.SSLContext | None) -> WSGIServer:
    """Serves the REST API and dashboard on api.rest_host:api.rest_port; raises OSError if it cannot bind.

    At most broker.max_connections HTTP connections are served at once (more wait in the listen
    backlog); one idle for broker.connection_timeout_secs is closed.
    """
    api_settings, broker = ctx.settings.api, ctx.settings.broker
    kwargs: dict[str, Any] = {"ssl_context": ssl_context} if ssl_context is not None else {}
    server = RestServer((api_settings.rest_host, api_settings.rest_port), build_app(ctx, query), log=None,
                        error_log=logging.getLogger("tqbroker.http"), handler_class=RestHandler,
                        spawn=Pool(broker.max_connections), **kwargs)
    server.idle_timeout_s = float(broker.connection_timeout_secs)
    server.start()
    return server
