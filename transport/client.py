"""The Python client of protocol v1: producers, workers, the CLI and the load tests all talk through it.

One TCP (optionally TLS) connection carries many requests at once (pipelining): the numbered requests,
their pending replies and the background reader that resolves them live in `transport.connection`; TLS
runs over memory BIOs in `transport.tls`. This module dials, numbers requests and types their replies.
Like those two, it never imports gevent, so the same code runs on OS threads or, monkey patched, on
greenlets.

Nothing here redials by itself: once the connection drops every pending and later request raises
`ConnectionLost`, because only the caller knows whether a request may be sent twice (SUBMIT is not
idempotent). `reconnect()` dials again.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from transport import messages as m
from transport import messages_ops as ops
from transport.connection import RECV_BYTES, Connection, PendingReply, error_reason
from transport.errors import (
    BrokerError,
    BrokerUnreachable,
    ClientError,
    ConnectionLost,
    ProtocolError,
    RequestTimeout,
)
from transport.frames import encode_frame, encode_frames
from transport.tls import TlsSocket

__all__ = ["MAX_REPLY_FRAME_BYTES", "PROTOCOL_VERSION", "RECV_BYTES", "Client", "PendingReply"]

PROTOCOL_VERSION = 1
# Replies (QUERY rows, WORKER_LIST) are bounded by the broker, not by its request limit; this only stops
# a corrupt length prefix from making the client buffer gigabytes.
MAX_REPLY_FRAME_BYTES = 256 * 1024 * 1024
_ID_SPAN = 0xFFFF_FFFF  # ids run 1..0xFFFF_FFFF; 0 is reserved for ERRORs that answer no request

M = TypeVar("M", bound=m.Message)
ReplyError = BrokerError | ClientError | RequestTimeout


def _wait_s(msg: m.Message) -> float:
    """Extra seconds a reply may legitimately take: a CLAIM is answered only when `wait_ms` runs out."""
    return msg.wait_ms / 1000 if type(msg) is m.Claim else 0.0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Client:
    """A pipelining protocol-v1 client. Thread- (and greenlet-) safe for requests; `connect`,
    `reconnect` and `close` are meant to be called by whoever owns the client, not concurrently."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, api_key: str | None = None,
                 timeout: float = 10.0, client_name: str = "tqbroker-python", tls: bool = False,
                 ca_file: str | None = None, connect: bool = True, *,
                 max_frame_bytes: int = MAX_REPLY_FRAME_BYTES) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.timeout = timeout
        self.client_name = client_name
        self.tls = tls
        self.ca_file = ca_file
        self.max_frame_bytes = max_frame_bytes
        self.welcome: m.Welcome | None = None
        self._conn: Connection | None = None
        self._ids = itertools.count(0)
        if connect:
            self.connect()

    # ------------------------------------------------------------ connection

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.dead is None

    def connect(self) -> m.Welcome:
        """Dial, wrap in TLS if asked, and HELLO; a no-op when already connected."""
        if self.connected:
            return self.welcome  # type: ignore[return-value]
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise BrokerUnreachable(f"broker not reachable at {self.address}: {error_reason(exc)}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                context = ssl.create_default_context(cafile=self.ca_file)
                ip = _is_ip(self.host)
                if ip:  # certificates name hosts; an IP still gets its chain verified
                    context.check_hostname = False
                sock = TlsSocket(sock, context, None if ip else self.host)  # type: ignore[assignment]
        except OSError as exc:
            sock.close()
            raise BrokerUnreachable(f"broker not reachable at {self.address}: TLS: {error_reason(exc)}") from exc
        conn = Connection(sock, self.address, self.max_frame_bytes)
        weakref.finalize(self, conn.lost, "client was garbage-collected")
        self._conn = conn
        try:
            self.welcome = self._call(m.Welcome, m.Hello, client=self.client_name, protocol=PROTOCOL_VERSION,
                                      api_key=self.api_key)
        except BaseException:
            conn.lost("handshake failed")
            raise
        return self.welcome

    def reconnect(self) -> m.Welcome:
        """Drop the current connection (its pending requests raise ConnectionLost) and dial again."""
        if self._conn is not None:
            self._conn.lost("connection closed by client (reconnect)")
        self._conn = None
        return self.connect()

    def close(self) -> None:
        """Close the connection; pending requests raise ConnectionLost. Safe to call twice."""
        conn = self._conn
        if conn is None:
            return
        conn.lost("connection closed by client")
        if conn.reader is not threading.current_thread():
            conn.reader.join(self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.address} {'connected' if self.connected else 'disconnected'}>"

    # ------------------------------------------------------------ low-level API

    def _live(self) -> Connection:
        conn = self._conn
        if conn is None:
            raise ConnectionLost(f"not connected to {self.address}")
        if conn.deferred is not None:
            error, conn.deferred = conn.deferred, None
            raise error
        if conn.dead is not None:
            raise ConnectionLost(conn.dead)
        return conn

    def _next_id(self, pending: dict[int, PendingReply]) -> int:
        request_id = next(self._ids) % _ID_SPAN + 1
        while request_id in pending:  # only after a wrap with a 4-billion-old request still waiting
            request_id = next(self._ids) % _ID_SPAN + 1
        return request_id

    def _call(self, expect: type[M], cls: type[m.Message], wait_s: float = 0.0, /, **fields: Any) -> M:
        """Send one `cls(id=..., **fields)` and wait for its reply, which must be an `expect`."""
        conn = self._live()
        request_id = self._next_id(conn.pending)
        slot = PendingReply(request_id, conn, time.monotonic() + self.timeout + wait_s)
        conn.send((slot,), encode_frame(cls(id=request_id, **fields)))
        reply = slot.get()
        if type(reply) is not expect:
            raise ProtocolError(f"broker answered {cls.__name__} with {type(reply).__name__}")
        return reply

    def send_async(self, msg: m.Message, timeout: float | None = None) -> PendingReply:
        """Send `msg` under a fresh id (its own `id` is ignored) and return the slot its reply lands in."""
        conn = self._live()
        request_id = self._next_id(conn.pending)
        base = self.timeout if timeout is None else timeout
        slot = PendingReply(request_id, conn, time.monotonic() + base + _wait_s(msg))
        conn.send((slot,), encode_frame(msgspec.structs.replace(msg, id=request_id)))
        return slot

    def request(self, msg: m.Message, timeout: float | None = None) -> m.Message:
        """Send `msg` and wait for its reply (an ERROR reply raises its BrokerError subclass)."""
        return self.send_async(msg, timeout).get()

    def pipeline(self, msgs: Sequence[m.Message], *, timeout: float | None = None,
                 return_exceptions: bool = False) -> list[Any]:
        """Send all `msgs` in one sendall and wait for every reply, in `msgs` order.

        With `return_exceptions` a failed request's exception takes its place in the list; otherwise the
        first failure is raised, but only after every reply is in, so none is left dangling.
        """
        conn = self._live()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        slots: list[PendingReply] = []
        framed: list[m.Message] = []
        for msg in msgs:
            request_id = self._next_id(conn.pending)
            framed.append(msgspec.structs.replace(msg, id=request_id))
            slots.append(PendingReply(request_id, conn, deadline + _wait_s(msg)))
        if not slots:
            return []
        conn.send(slots, encode_frames(framed))
        results: list[Any] = []
        first: ReplyError | None = None
        for slot in slots:
            try:
                results.append(slot.get())
            except (BrokerError, ClientError, RequestTimeout) as exc:
                results.append(exc)
                first = first or exc
        if first is not None and not return_exceptions:
            raise first
        return results

    # ------------------------------------------------------------ typed requests

    def submit(self, kind: str, payload: bytes = b"", *, queue: str = "default",
               priority: int | m.PriorityName = "normal", run_at: float | None = None, max_retries: int | None = None,
               lease_ms: int | None = None, unique_key: str | None = None) -> m.Submitted:
        """Submit one task; `.task_id`, and `.duplicate` when `unique_key` matched a live task."""
        task = m.TaskSpec(kind=kind, payload=payload, queue=queue, priority=priority, run_at=run_at,
                        max_retries=max_retries, lease_ms=lease_ms, unique_key=unique_key)
        return self._call(m.Submitted, m.Submit, task=task)

    def submit_batch(self, specs: list[m.TaskSpec]) -> list[str]:
        """Submit 1–10,000 tasks atomically; their ids in the same order."""
        return self._call(m.SubmittedBatch, m.SubmitBatch, tasks=specs).task_ids

    def claim(self, worker_id: str, queues: list[str], max_tasks: int = 1,
              wait_ms: int = 0) -> list[m.Assignment]:
        """Up to `max_tasks` tasks, waiting up to `wait_ms` for the first; empty when none came."""
        return self._call(m.Assigned, m.Claim, wait_ms / 1000, worker_id=worker_id, queues=queues,
                          max_tasks=max_tasks, wait_ms=wait_ms).tasks

    def complete(self, worker_id: str, task_id: str, result: bytes = b"") -> None:
        self._call(m.Ok, m.Result, worker_id=worker_id, task_id=task_id, ok=True, result=result)

    def fail(self, worker_id: str, task_id: str, error: str, retry: bool = True) -> None:
        self._call(m.Ok, m.Result, worker_id=worker_id, task_id=task_id, ok=False, error=error, retry=retry)

    def heartbeat(self, worker_id: str, active: list[str], cpu_percent: float | None = None,
                  memory_bytes: int | None = None) -> None:
        self._call(m.Ok, m.Heartbeat, worker_id=worker_id, active=active, cpu_percent=cpu_percent,
                   memory_bytes=memory_bytes)

    def status(self, task_id: str) -> m.TaskInfo:
        return self._call(m.TaskStatus, m.Status, task_id=task_id).task

    def cancel(self, task_id: str) -> None:
        self._call(m.Ok, m.Cancel, task_id=task_id)

    def stats(self) -> m.StatsInfo:
        return self._call(m.StatsReply, m.Stats).stats

    def register(self, worker_id: str | None = None, *, name: str | None = None, hostname: str | None = None,
                 pid: int | None = None, queues: list[str] | None = None, concurrency: int | None = None,
                 metadata: dict[str, str] | None = None) -> str:
        """Register a worker; the broker picks the id when `worker_id` is None."""
        return self._call(m.Registered, m.Register, worker_id=worker_id, name=name, hostname=hostname,
                          pid=pid, queues=queues, concurrency=concurrency, metadata=metadata).worker_id

    def deregister(self, worker_id: str) -> None:
        self._call(m.Ok, m.Deregister, worker_id=worker_id)

    def workers(self) -> list[m.WorkerInfo]:
        return self._call(m.WorkerList, m.Workers).workers

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        """Run one read-only SQL statement over the task history: `(columns, rows)`."""
        rows = self._call(m.Rows, m.Query, sql=sql)
        return rows.columns, rows.rows

    def query_rows(self, sql: str) -> m.Rows:
        """`query`, as the ROWS reply itself (with `truncated`: rows were left out)."""
        return self._call(m.Rows, m.Query, sql=sql)

    # ------------------------------------------------------------ queue operations (protocol 1.1)

    def pause(self, queue: str) -> None:
        """The queue keeps accepting SUBMITs but hands nothing out until `resume`."""
        self._call(m.Ok, ops.Pause, queue=queue)

    def resume(self, queue: str) -> None:
        self._call(m.Ok, ops.Resume, queue=queue)

    def rate_limit(self, queue: str, per_second: float | None) -> None:
        """At most `per_second` claims per second from `queue` across all workers; None clears it."""
        self._call(m.Ok, ops.RateLimit, queue=queue, per_second=per_second)

    def purge(self, queue: str, scheduled: bool = False) -> int:
        """Cancels the queue's pending (and with `scheduled`, scheduled) tasks; returns how many."""
        return self._call(ops.Count, ops.Purge, queue=queue, scheduled=scheduled).count

    def requeue(self, task_id: str | None = None, *, all: bool = False, queue: str | None = None,
                kind: str | None = None) -> int:
        """Dead tasks back to pending under the same id: one `task_id`, or `all=True` (optionally filtered)."""
        return self._call(ops.Count, ops.Requeue, task_id=task_id, all=all, queue=queue, kind=kind).count

    def delete_dead(self, task_id: str | None = None, *, all: bool = False, queue: str | None = None,
                    kind: str | None = None) -> int:
        return self._call(ops.Count, ops.DeleteDead, task_id=task_id, all=all, queue=queue, kind=kind).count

    def queues(self) -> list[ops.QueueInfo]:
        return self._call(ops.QueueList, ops.Queues).queues

    def dead(self, queue: str | None = None, kind: str | None = None, limit: int = 100, after: int | None = None,
             newest_first: bool = False) -> ops.DeadPage:
        """One page of the dead set; pass the page's `next` as `after` for the following one."""
        return self._call(ops.DeadPage, ops.DeadList, queue=queue, kind=kind, limit=limit, after=after,
                          newest_first=newest_first)

    def browse(self, state: str, *, queue: str | None = None, kind: str | None = None, limit: int = 100,
               cursor: str | None = None, newest_first: bool = False) -> ops.TaskPage:
        """One page of tasks in `state`; pass the page's `next` as `cursor` for the following one."""
        return self._call(ops.TaskPage, ops.Browse, state=state, queue=queue, kind=kind, limit=limit,
                          cursor=cursor, newest_first=newest_first)

    def schedule_add(self, name: str, cron: str, task: m.TaskSpec, *, tz: str = "UTC", enabled: bool = True,
                     since: float | None = None) -> None:
        """Adds or replaces the cron schedule `name`: one `task` per fire time of `cron` (5 fields) in `tz`."""
        self._call(m.Ok, ops.ScheduleAdd, name=name, cron=cron, task=task, tz=tz, enabled=enabled, since=since)

    def schedule_remove(self, name: str) -> None:
        self._call(m.Ok, ops.ScheduleRemove, name=name)

    def schedules(self) -> list[ops.ScheduleInfo]:
        return self._call(ops.ScheduleList, ops.Schedules).schedules
