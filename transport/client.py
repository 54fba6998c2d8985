"""The Python client of protocol v1: producers, workers, the CLI and the load tests all talk through it.

One TCP (optionally TLS) connection carries many requests at once: each request gets a u32 id, is
written with one `sendall` under a write lock, and parks a `PendingReply` in a dict keyed by that id. A
single background reader decodes every reply and resolves the slot with the same id, so replies may come
back in any order (a waiting CLAIM does not hold up a STATS sent after it). The reader is a plain
`threading.Thread`: unpatched it is an OS thread, under gevent monkey patching the same code becomes a
greenlet, which is why this module never imports gevent and looks `threading`/`socket` names up at call
time.

Nothing here redials by itself: once the connection drops every pending and later request raises
`ConnectionLost`, because only the caller knows whether a request may be sent twice (SUBMIT is not
idempotent). `reconnect()` dials again.

TLS runs over memory BIOs (`_TlsSocket`) rather than `ssl.SSLSocket`, because the reader and the writers
would otherwise call SSL_read and SSL_write on one SSL object at the same time, which OpenSSL does not
support (it showed up as a HELLO that never got its WELCOME).
"""

from __future__ import annotations

import copy
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
from transport.errors import (
    BrokerError,
    BrokerUnreachable,
    ClientError,
    ConnectionLost,
    ProtocolError,
    RequestTimeout,
    error_from_reply,
)
from transport.frames import FrameError, FrameReader, decode_response, encode_frame, encode_frames

PROTOCOL_VERSION = 1
RECV_BYTES = 256 * 1024
# Replies (QUERY rows, WORKER_LIST) are bounded by the broker, not by its request limit; this only stops
# a corrupt length prefix from making the client buffer gigabytes.
MAX_REPLY_FRAME_BYTES = 256 * 1024 * 1024
_ID_SPAN = 0xFFFF_FFFF  # ids run 1..0xFFFF_FFFF; 0 is reserved for ERRORs that answer no request
_ERROR_TYPE = m.Error.type_byte

M = TypeVar("M", bound=m.Message)
ReplyError = BrokerError | ClientError | RequestTimeout


def _wait_s(msg: m.Message) -> float:
    """Extra seconds a reply may legitimately take: a CLAIM is answered only when `wait_ms` runs out."""
    return msg.wait_ms / 1000 if type(msg) is m.Claim else 0.0


class PendingReply:
    """The slot one in-flight request waits on; resolved exactly once by the reader (or a failure).

    A pre-acquired lock is the waiter: cheaper than an Event (no Condition), and under gevent patching
    it is gevent's lock, so waiting yields to the reader greenlet.
    """

    __slots__ = ("id", "_conn", "_deadline", "_lock", "_reply", "_error", "_done")

    def __init__(self, request_id: int, conn: _Connection, deadline: float) -> None:
        self.id = request_id
        self._conn = conn
        self._deadline = deadline
        self._lock = threading.Lock()
        self._lock.acquire()
        self._reply: m.Message | None = None
        self._error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        """Whether `get()` would return at once."""
        return self._done

    def get(self, timeout: float | None = None) -> m.Message:
        """The reply, or raise its mapped exception. `timeout=None` waits until the deadline set when
        the request was sent (client timeout, plus `wait_ms` for a CLAIM)."""
        if not self._done:
            wait = self._deadline - time.monotonic() if timeout is None else timeout
            if not self._lock.acquire(True, max(wait, 0.0)):
                if self._conn.pending.pop(self.id, None) is not None:
                    self._error = RequestTimeout(f"no reply to request {self.id} within the timeout")
                    self._done = True
                    raise self._error
                self._lock.acquire()  # the reader already took the slot: its resolve is imminent
            self._lock.release()  # let any other waiter on the same reply through
        if self._error is not None:
            raise self._error
        return self._reply  # type: ignore[return-value]

    def _resolve(self, reply: m.Message) -> None:
        self._reply = reply
        self._done = True
        self._lock.release()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done = True
        self._lock.release()


class _Connection:
    """One dialed socket with its reader and pending replies. `reconnect()` makes a fresh one, so a stale
    reader can never resolve or kill the requests of the next connection."""

    def __init__(self, sock: socket.socket, address: str, max_frame_bytes: int) -> None:
        self.sock = sock
        self.address = address
        self.max_frame_bytes = max_frame_bytes
        self.pending: dict[int, PendingReply] = {}
        self.dead: str | None = None  # why the connection is unusable, once it is
        self.deferred: BrokerError | None = None  # an id-0 ERROR that found nothing pending
        self.id0_error: BrokerError | None = None  # the last id-0 ERROR: why the broker then hangs up
        self.wlock = threading.Lock()
        self._lost_lock = threading.Lock()
        self.reader = threading.Thread(target=self._read_loop, name=f"tqbroker-reader-{address}", daemon=True)
        self.reader.start()

    def send(self, replies: Sequence[PendingReply], data: bytes) -> None:
        """Register `replies` and write `data` (their frames) with one sendall.

        Never raises: if the connection is or goes dead, `lost()` fails the just-registered replies too
        (with the id-0 ERROR that killed it, if any), so their `get()` raises the right exception.
        """
        pending = self.pending
        for reply in replies:
            pending[reply.id] = reply
        reason = self.dead
        if reason is None:
            try:
                with self.wlock:
                    self.sock.sendall(data)
                return
            except (OSError, ValueError) as exc:  # a partial frame leaves the stream unusable
                reason = f"send to {self.address} failed: {_reason(exc)}"
        self.lost(reason)

    def lost(self, reason: str) -> None:
        """Mark the connection dead and fail everything pending. Idempotent; any thread may call it."""
        if self.id0_error is not None:  # whatever the socket said, this is why the broker hung up
            reason = f"connection closed by broker after {self.id0_error} ({reason})"
        with self._lost_lock:
            first = self.dead is None
            if first:
                self.dead = reason
        if first:
            try:  # wakes the reader and any writer; the reader closes the fd so it cannot be reused early
                self.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass
        drained = self._drain()
        deferred = self.deferred
        if drained and deferred is not None:  # the id-0 ERROR that closed us is the news for these
            self.deferred = None
        for reply in drained:
            reply._fail(copy.copy(deferred) if deferred is not None else ConnectionLost(self.dead or reason))

    def _drain(self) -> list[PendingReply]:
        """Take every pending slot; popitem is atomic, so a concurrent drain never fails one twice."""
        drained: list[PendingReply] = []
        while True:
            try:
                drained.append(self.pending.popitem()[1])
            except KeyError:
                return drained

    def _fail_all(self, error: BrokerError) -> None:
        """An ERROR with id 0 answers no request, so it is news for every request in flight (or, with
        none in flight, for the next request made)."""
        self.id0_error = error
        drained = self._drain()
        for reply in drained:
            reply._fail(copy.copy(error))
        if not drained:
            self.deferred = error

    def _dispatch(self, frames: list[tuple[int, bytes]]) -> None:
        pending = self.pending
        for type_byte, payload in frames:
            reply = decode_response(type_byte, payload)
            if type_byte == _ERROR_TYPE:
                if reply.id == 0:
                    self._fail_all(error_from_reply(reply))  # type: ignore[arg-type]
                    continue
                slot = pending.pop(reply.id, None)
                if slot is not None:
                    slot._fail(error_from_reply(reply))  # type: ignore[arg-type]
            else:
                slot = pending.pop(reply.id, None)  # None: a late reply to a timed-out request
                if slot is not None:
                    slot._resolve(reply)

    def _read_loop(self) -> None:
        reason = "connection closed by broker"
        sock = self.sock
        feed = FrameReader(self.max_frame_bytes).feed
        try:
            while True:
                try:
                    data = sock.recv(RECV_BYTES)
                except TimeoutError:  # the socket timeout bounds sendall; an idle read is fine
                    if self.dead is not None:
                        return
                    continue
                if not data:
                    break
                self._dispatch(feed(data))
        except FrameError as exc:
            reason = f"broker sent a bad frame: {exc.message}"
            try:
                self._dispatch(getattr(exc, "frames", []))
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reason = f"broker sent an undecodable reply: {exc}"
        except (OSError, ValueError) as exc:
            reason = f"connection to {self.address} failed: {exc}"
        finally:
            self.lost(reason)
            with self.wlock:
                sock.close()


class _TlsSocket:
    """TLS over a plain socket through `ssl.SSLObject` and memory BIOs.

    The socket I/O stays plain (full duplex: the reader's recv and the writers' sendall may overlap) and
    only the in-memory encrypt/decrypt steps touch the SSL object, under a lock, never blocking. Writers
    are already serialised by the connection's write lock; `_send_lock` additionally orders the reader's
    rare own records (a TLS 1.3 KeyUpdate answer) with theirs.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        while True:  # the handshake, before the reader exists: no locking needed yet
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._sock.sendall(self._out.read())
                data = self._sock.recv(RECV_BYTES)
                if not data:
                    raise ConnectionResetError("connection closed during the TLS handshake") from None
                self._in.write(data)
        self._sock.sendall(self._out.read())

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._tls_lock:
                self._tls.write(data)  # a memory BIO never says "would block": all of it is encrypted
                out = self._out.read()
            self._sock.sendall(out)

    def recv(self, size: int) -> bytes:
        while True:
            with self._tls_lock:
                try:
                    return self._tls.read(size)
                except ssl.SSLZeroReturnError:  # close_notify
                    return b""
                except ssl.SSLWantReadError:
                    pass
                reply = self._out.pending
            if reply and self._send_lock.acquire(False):  # else a writer is mid-send; flush next time
                try:
                    with self._tls_lock:
                        out = self._out.read()
                    self._sock.sendall(out)
                finally:
                    self._send_lock.release()
            data = self._sock.recv(size)
            if not data:
                return b""
            with self._tls_lock:
                self._in.write(data)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


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
        self._conn: _Connection | None = None
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
            raise BrokerUnreachable(f"broker not reachable at {self.address}: {_reason(exc)}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                context = ssl.create_default_context(cafile=self.ca_file)
                ip = _is_ip(self.host)
                if ip:  # certificates name hosts; an IP still gets its chain verified
                    context.check_hostname = False
                sock = _TlsSocket(sock, context, None if ip else self.host)  # type: ignore[assignment]
        except OSError as exc:
            sock.close()
            raise BrokerUnreachable(f"broker not reachable at {self.address}: TLS: {_reason(exc)}") from exc
        conn = _Connection(sock, self.address, self.max_frame_bytes)
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

    def _live(self) -> _Connection:
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
        return reply  # type: ignore[return-value]

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
               priority: int | str = "normal", run_at: float | None = None, max_retries: int | None = None,
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
