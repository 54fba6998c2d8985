"""The reader loop of one connection (`serve_connection`), run by the server in the connection's greenlet.

Per `recv`: decode every complete frame and hand them to the connection's `Session` (actors.connection);
then, for the incomplete frame left in the buffer, reserve its announced length from the server-wide
frame budget (`broker.max_inflight_frame_bytes`) BEFORE reading its body. While the budget is short the
reader does not read at all (the bytes wait in the kernel's socket buffer), up to the frame deadline;
then the frame is refused with `ERROR{id: 0, QUEUE_FULL}` and the connection closed. With auth on, the
first frame may be at most `auth.max_hello_bytes`, so an unauthenticated peer cannot hold more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import socket
import ssl
import time
from typing import Any

import gevent

from actors.connection import Session
from actors.context import BrokerContext
from actors.outbox import MAX_IN_FLIGHT
from config.settings import Settings
from transport.connection import RECV_BYTES
from transport.frames import FrameError, FrameReader, encode_frame
from transport.messages import Error, ErrorCode

log = logging.getLogger("tqbroker.connection")

LARGE_BUFFER_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_buffers_to_the_os() -> bool:
    """Fixes glibc's mmap threshold at 1 MiB, so every buffer of a big frame is its own mapping: freed,
    it goes back to the OS at once, and growing it is an mremap, not a copy beside the old one.

    glibc otherwise raises the threshold after the first big free (up to 32 MiB); big frame buffers then
    come from the heap, which fragments and keeps the broker's RSS near its peak for good. Returns
    whether it applied (glibc only).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))
    except (OSError, AttributeError):
        return False


class Receiver:
    """Reads one connection: waits until its socket is readable, then one `recv`.

    gevent's `recv` tries first and waits only on EAGAIN, which for a client that waits for each reply
    is a failed syscall per request (see docs/performance.md#reading-a-connection). Not for TLS:
    decrypted bytes may wait in the SSL object while the socket itself has nothing to read.

    A read that fills the buffer is followed by another without waiting, and gevent's `recv` does not
    yield while data is there: a peer streaming a big frame would keep the hub from every other
    connection (and from accepting new ones). So every FULL_READS_PER_YIELD full reads in a row yield once.
    """

    FULL_READS_PER_YIELD = 8

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._hub = gevent.get_hub()
        self._readable = None if isinstance(sock, ssl.SSLSocket) else self._hub.loop.io(sock.fileno(), 1)
        self._full = False
        self._full_reads = 0

    def recv(self) -> bytes:
        if not self._full:
            if self._readable is not None:
                self._hub.wait(self._readable)
        elif self._full_reads >= self.FULL_READS_PER_YIELD:
            self._full_reads = 0
            gevent.sleep(0)
        data = self.sock.recv(RECV_BYTES)
        self._full = len(data) == RECV_BYTES
        self._full_reads += self._full
        return data

    def close(self) -> None:
        if self._readable is not None:
            self._readable.close()


def frame_reader(settings: Settings) -> FrameReader:
    """A connection's frame reader: with auth on, its first frame (the HELLO) is bounded by max_hello_bytes."""
    auth, limit = settings.auth, settings.broker.max_frame_bytes
    if not auth.enabled:
        return FrameReader(limit)
    return FrameReader(limit, first_frame_limit=auth.max_hello_bytes, first_frame_limit_error=(
        ErrorCode.UNAUTHORIZED,
        "authentication required: the first frame ({length} bytes) is over auth.max_hello_bytes ({limit}); "
        "send a HELLO with a valid api_key first (or raise auth.max_hello_bytes for longer keys)"))


def serve_connection(ctx: BrokerContext, sock: socket.socket, address: Any) -> None:
    """The reader loop of one connection."""
    ip = address[0] if isinstance(address, tuple) else str(address)
    peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    refusal = ctx.refuse_peer(address)
    if refusal is not None:
        ctx.peer_log.log(logging.WARNING, f"refused {ip}", "connection refused: %s", refusal, extra={"peer": peer})
        ctx.metrics.count_errors([ErrorCode.UNAUTHORIZED])
        _send_and_close(sock, Error(id=0, code=ErrorCode.UNAUTHORIZED, message=refusal))
        return
    session = Session(ctx, sock, peer, ip)
    reader = frame_reader(ctx.settings)
    state, monotonic, receiver = session.state, time.monotonic, Receiver(sock)
    ctx.server.track(session)
    ctx.idle.watch(session, session.sweep_every)  # no socket timeout: see actors.idle
    try:
        while not state.closed:
            try:
                data = receiver.recv()
            except (OSError, ValueError):  # ValueError: a TLS socket the idle sweeper shut down
                break
            if not data:
                break
            state.active_at = now = monotonic()
            try:
                frames = reader.feed(data)
            except FrameError as exc:
                _refuse_frame(session, exc)
                break
            session.frames_seen += len(frames)
            if not session.route(frames, len(data)):
                break
            if reader.buffered == 0:
                session.release_frame()
            elif not session.hold_frame(bool(frames) or not session.frame_started_at, reader.partial_length, now):
                _refuse_for_budget(session, reader.partial_length)
                break
            if state.in_flight > MAX_IN_FLIGHT:
                state.drained.clear()
                state.drained.wait()
    finally:
        session.release_frame()
        ctx.idle.unwatch(session)
        receiver.close()
        session.close()
        ctx.server.untrack(session)  # last: the server counts this connection until the handler returns


def _refuse_frame(session: Session, exc: FrameError) -> None:
    """A framing violation: answer the frames before it, then the error, then close."""
    if exc.code == ErrorCode.UNAUTHORIZED:
        session.auth_failed()
    session.route(exc.frames)
    session.refuse(Error(id=0, code=exc.code, message=exc.message))


def _refuse_for_budget(session: Session, need: int) -> None:
    """No budget for a frame within its deadline: nothing of it was read or accepted; the client may retry."""
    ctx = session.ctx
    limit = ctx.settings.broker.max_inflight_frame_bytes
    ctx.metrics.frame_budget_refusals.inc()
    ctx.peer_log.log(logging.WARNING, "frame-budget", "refusing a frame of %d bytes from %s: "
                     "broker.max_inflight_frame_bytes (%d) stayed in use for broker.frame_timeout_secs",
                     need - 4, session.peer, limit, extra={"peer": session.peer})
    session.refuse(Error(id=0, code=ErrorCode.QUEUE_FULL, message=(
        f"the broker is already receiving broker.max_inflight_frame_bytes ({limit}) bytes of frames and found "
        f"no room for this frame of {need - 4} bytes within broker.frame_timeout_secs; nothing in it was "
        "accepted: reconnect and retry later")))


def _send_and_close(sock: socket.socket, error: Error) -> None:
    try:
        sock.sendall(encode_frame(error))
    except OSError:
        pass
    finally:
        sock.close()
