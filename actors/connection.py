"""One connection: its reader loop, its reply address (`actors.outbox`) and its ConnectionActor.

A connection has two halves on the same gevent hub. Its reader (the server's handler greenlet, in
`serve_connection`) decodes all frames of each `recv()` and routes them: queue-bound requests go to the
queue actor as ONE message, worker requests to the registry, HELLO and framing errors are answered
here. Every request carries the connection's `ConnectionOutbox` as its reply address: a reply with
nothing queued ahead of it leaves at once with one non-blocking send from the replying greenlet; the
others (and the rest of a partial send) go through the ConnectionActor, the only one that waits on a
slow client. Idle connections are closed by one sweeper greenlet (`actors.idle`), not socket timeouts.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

import gevent
import pykka

from actors.browse_history import history_page
from actors.context import BrokerContext
from actors.envelopes import ConnectionClosed, QueueRequests, RegistryRequest, Replies
from actors.hub_actor import HubActor
from actors.outbox import MAX_IN_FLIGHT, ConnectionOutbox, ConnectionState, Unsent
from transport.frames import FrameError, FrameReader, decode_request, encode_frame
from transport.messages import (
    Cancel,
    Claim,
    Deregister,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Message,
    Query,
    Register,
    Result,
    Rows,
    Stats,
    Status,
    Submit,
    SubmitBatch,
    Welcome,
    Workers,
)
from transport.messages_ops import ADMIN_REQUESTS, HISTORY_STATES, PROTOCOL_VERSION, Browse

log = logging.getLogger("tqbroker.connection")

RECV_BYTES = 64 * 1024  # under glibc's mmap threshold, so a read costs no mmap+munmap
_QUEUE_REQUESTS = (Submit, SubmitBatch, Claim, Result, Status, Cancel, *ADMIN_REQUESTS)
_REGISTRY_REQUESTS = (Register, Deregister, Heartbeat, Stats, Workers)


class ConnectionActor(HubActor):
    """Sends the replies that could not leave inline (see `actors.outbox`).

    The one greenlet allowed to wait on a slow client: a reply reaches it when another is queued or
    being sent ahead of it, when the kernel took only part of an inline send, or when it closes the
    connection.
    """

    def __init__(self, outbox: ConnectionOutbox) -> None:
        super().__init__()
        self.outbox = outbox

    def on_receive(self, message: Any) -> None:
        outbox = self.outbox
        if isinstance(message, Replies):
            outbox.deliver(message, blocking=True)
        elif isinstance(message, Unsent) and not outbox.state.closed:
            try:
                outbox.send_blocking(message.data)
            except OSError:
                outbox.state.closed = True


class Session:
    """The reader's view of one connection: who it is and whether it has authenticated."""

    def __init__(self, ctx: BrokerContext, sock: socket.socket, peer: str) -> None:
        self.ctx = ctx
        self.sock = sock
        self.peer = peer
        self.authenticated = not ctx.settings.auth.enabled
        self.idle_timeout = ctx.settings.broker.connection_timeout_secs
        self.state = ConnectionState()
        self.outbox = ConnectionOutbox(sock, self.state, ctx.metrics)  # every request's reply address
        self.actor = ConnectionActor.start(self.outbox)
        self.outbox.bind(self.actor)

    def sweep(self, now: float) -> None:
        """Called by the idle sweeper: shuts the socket down once nothing came in for the idle timeout.

        A waiting long-poll CLAIM spares the connection. The shutdown wakes the reader (its `recv`
        fails, so the connection closes the usual way) and an actor stuck in `sendall` to a client
        that stopped reading.
        """
        state = self.state
        if state.closed or state.waiting_claims or now - state.active_at < self.idle_timeout:
            return
        log.info("closing idle connection after %s s", self.idle_timeout, extra={"peer": self.peer})
        self.outbox.shutdown()

    def route(self, frames: list[tuple[int, bytes]], nbytes: int = 0) -> bool:
        """Routes decoded frames; False when the connection must close (failed authentication)."""
        ctx, direct, to_queue = self.ctx, [], []
        for type_byte, payload in frames:
            msg = decode_request(type_byte, payload)
            if not self.authenticated:
                if not self._authenticate(msg, direct):
                    self._send(direct, close=True)
                    return False
                continue
            if isinstance(msg, Browse) and msg.state in HISTORY_STATES:  # read from task_history, not memory
                self.state.in_flight += 1
                gevent.spawn(self._query, msg)
            elif isinstance(msg, _QUEUE_REQUESTS):
                to_queue.append(msg)
                if isinstance(msg, Claim) and msg.wait_ms > 0:
                    self.state.waiting_claims.add(msg.id)
            elif isinstance(msg, _REGISTRY_REQUESTS):
                self.state.in_flight += 1
                ctx.registry.tell(RegistryRequest(msg, self.outbox, ctx.server.connections))
            elif isinstance(msg, Hello):
                direct.append(self._welcome(msg))
            elif isinstance(msg, Query):
                self.state.in_flight += 1
                gevent.spawn(self._query, msg)
            else:
                direct.append(msg)
        if to_queue:
            self.state.in_flight += len(to_queue)
            ctx.queue.tell(QueueRequests(to_queue, self.outbox, nbytes))
        if direct:
            self._send(direct)
        return True

    def _send(self, messages: list[Message], close: bool = False) -> None:
        self.state.in_flight += len(messages)
        self.outbox.tell(Replies(messages, close=close))

    def _authenticate(self, msg: Message, direct: list[Message]) -> bool:
        """With auth enabled, the first frame must be a HELLO carrying a valid key."""
        if not isinstance(msg, Hello):
            direct.append(Error(id=msg.id, code=ErrorCode.UNAUTHORIZED,  # type: ignore[attr-defined]
                                message="authentication required: the first frame must be a valid HELLO with "
                                        "an api_key"))
            return False
        if not self.ctx.keys.accepts(msg.api_key):
            log.warning("authentication failed", extra={"peer": self.peer})
            direct.append(Error(id=msg.id, code=ErrorCode.UNAUTHORIZED, message="invalid api_key"))
            return False
        self.authenticated = True
        direct.append(self._welcome(msg))
        return True

    def _welcome(self, msg: Hello) -> Message:
        if msg.protocol != 1:
            return Error(id=msg.id, code=ErrorCode.BAD_REQUEST,
                         message=f"protocol {msg.protocol} is not supported; this broker speaks protocol 1")
        s = self.ctx.settings
        return Welcome(id=msg.id, server=self.ctx.server_name, protocol=1, version=PROTOCOL_VERSION,
                       heartbeat_interval_ms=int(s.worker.heartbeat_interval_secs * 1000),
                       max_batch_claim=s.broker.max_batch_claim)

    def _query(self, msg: Query | Browse) -> None:
        reply: Message
        try:
            if isinstance(msg, Browse):
                reply = history_page(self.ctx.run_query, msg)
            else:
                columns, rows = self.ctx.run_query(msg.sql)
                reply = Rows(id=msg.id, columns=columns, rows=rows)
        except Exception as exc:  # QueryRefused / QueryTimeout / no history: all user-facing text
            code = getattr(exc, "code", ErrorCode.BAD_REQUEST)
            reply = Error(id=msg.id, code=code, message=getattr(exc, "message", None) or str(exc))
        try:
            self.outbox.tell(Replies([reply]))
        except pykka.ActorDeadError:  # the client went away while its query ran
            pass

    def close(self) -> None:
        """Lets the actor send what it already has, then stops it; waiting claims are withdrawn."""
        if self.state.waiting_claims:
            self.ctx.queue.tell(ConnectionClosed(reply_to=self.outbox))
        try:
            self.actor.stop(block=True, timeout=5.0)
        except (pykka.Timeout, pykka.ActorDeadError):
            pass


class Receiver:
    """Reads one connection: waits until its socket is readable, then one `recv`.

    gevent's `recv` tries first and waits only on EAGAIN. A client that sends one request and waits
    for the reply (figure a of the benchmark) has sent nothing more right after its request was
    routed, so that try was a failed syscall and a raised exception per request: waiting first
    measured 7-10 µs/request less there, and no change pipelined (figure b), where a read that filled
    the buffer is followed by an immediate `recv` anyway. Not for TLS: decrypted bytes may wait in
    the SSL object while the socket itself has nothing to read.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._hub = gevent.get_hub()
        self._readable = None if isinstance(sock, ssl.SSLSocket) else self._hub.loop.io(sock.fileno(), 1)
        self._full = False

    def recv(self) -> bytes:
        if self._readable is not None and not self._full:
            self._hub.wait(self._readable)
        data = self.sock.recv(RECV_BYTES)
        self._full = len(data) == RECV_BYTES
        return data

    def close(self) -> None:
        if self._readable is not None:
            self._readable.close()


def serve_connection(ctx: BrokerContext, sock: socket.socket, address: Any) -> None:
    """The reader loop of one connection, run by the server in the connection's own greenlet."""
    peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    refusal = ctx.refuse_peer(address)
    if refusal is not None:
        log.warning("connection refused: %s", refusal, extra={"peer": peer})
        ctx.metrics.count_errors([ErrorCode.UNAUTHORIZED])
        _send_and_close(sock, Error(id=0, code=ErrorCode.UNAUTHORIZED, message=refusal))
        return
    session = Session(ctx, sock, peer)
    reader = FrameReader(ctx.settings.broker.max_frame_bytes)
    state, monotonic, receiver = session.state, time.monotonic, Receiver(sock)
    ctx.idle.watch(session, session.idle_timeout)  # no socket timeout: see actors.idle
    try:
        while not state.closed:
            try:
                data = receiver.recv()
            except (OSError, ValueError):  # ValueError: a TLS socket the idle sweeper shut down
                break
            if not data:
                break
            state.active_at = monotonic()
            try:
                frames = reader.feed(data)
            except FrameError as exc:
                session.route(exc.frames)  # type: ignore[attr-defined]
                session._send([Error(id=0, code=exc.code, message=exc.message)], close=True)
                break
            if not session.route(frames, len(data)):
                break
            if state.in_flight > MAX_IN_FLIGHT:
                state.drained.clear()
                state.drained.wait()
    finally:
        ctx.idle.unwatch(session)
        receiver.close()
        session.close()


def _send_and_close(sock: socket.socket, error: Error) -> None:
    try:
        sock.sendall(encode_frame(error))
    except OSError:
        pass
    finally:
        sock.close()
