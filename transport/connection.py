"""One dialed connection of the Python client: the pending-reply map and the reader that resolves it.

Pipelining: each request gets a u32 id, is written with one `sendall` under a write lock, and parks a
`PendingReply` in a dict keyed by that id. A single background reader decodes every reply and resolves
the slot with the same id, so replies may come back in any order (a waiting CLAIM does not hold up a
STATS sent after it). The reader is a plain `threading.Thread`: unpatched it is an OS thread, under
gevent monkey patching the same code becomes a greenlet, which is why this module never imports gevent
and looks `threading`/`socket` names up at call time.

Why apart from `transport.client`: this is the concurrency (locks, the reader, failing everything once
the socket dies); the client on top only numbers requests and types the replies.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Sequence

import msgspec

from transport import messages as m
from transport.errors import BrokerError, ConnectionLost, RequestTimeout, error_from_reply
from transport.frames import FrameError, FrameReader, decode_response

RECV_BYTES = 64 * 1024  # under glibc's mmap threshold: a larger recv buffer costs an mmap+munmap per read
_ERROR_TYPE = m.Error.type_byte


def error_reason(exc: BaseException) -> str:
    """The short human reason of a socket (or TLS) failure, for ConnectionLost / BrokerUnreachable."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


class PendingReply:
    """The slot one in-flight request waits on; resolved exactly once by the reader (or a failure).

    A pre-acquired lock is the waiter: cheaper than an Event (no Condition), and under gevent patching
    it is gevent's lock, so waiting yields to the reader greenlet.
    """

    __slots__ = ("id", "_conn", "_deadline", "_lock", "_reply", "_error", "_done")

    def __init__(self, request_id: int, conn: Connection, deadline: float) -> None:
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


class Connection:
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
                reason = f"send to {self.address} failed: {error_reason(exc)}"
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
