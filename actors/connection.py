"""One ConnectionActor per socket: the reply address of every request that came in on it.

A connection has two halves on the same gevent hub. Its reader (the server's handler greenlet, in
`serve_connection`) decodes all frames of each `recv()` and routes them: queue-bound requests go to the
queue actor as ONE message, worker requests to the registry, HELLO and framing errors are answered
here. The actor is the only writer: every reply is told to it and leaves with one `sendall`.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import gevent
import gevent.event
import pykka

from actors.context import BrokerContext
from actors.envelopes import ConnectionClosed, QueueRequests, RegistryRequest, Replies
from actors.metrics import BrokerMetrics
from transport.frames import FrameError, FrameReader, decode_request, encode_frame, encode_frames
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

log = logging.getLogger("tqbroker.connection")

RECV_BYTES = 64 * 1024  # under glibc's mmap threshold, so a read costs no mmap+munmap
MAX_IN_FLIGHT = 20_000  # requests routed but not yet answered; the reader pauses above this
_QUEUE_REQUESTS = (Submit, SubmitBatch, Claim, Result, Status, Cancel)
_REGISTRY_REQUESTS = (Register, Deregister, Heartbeat, Stats, Workers)


class ConnectionState:
    """Counters shared by a connection's reader greenlet and its actor (both on one hub).

    `waiting_claims` holds the ids of long-poll CLAIMs not yet answered: the idle timeout spares a
    connection that has one. `in_flight` bounds the requests routed but not yet answered.
    """

    __slots__ = ("in_flight", "waiting_claims", "closed", "drained")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting_claims: set[int] = set()
        self.closed = False
        self.drained = gevent.event.Event()
        self.drained.set()


class ConnectionActor(pykka.ThreadingActor):
    def __init__(self, sock: socket.socket, peer: str, state: ConnectionState, metrics: BrokerMetrics) -> None:
        super().__init__()
        self.metrics = metrics
        self.sock = sock
        self.peer = peer
        self.state = state

    def on_receive(self, message: Any) -> None:
        if not isinstance(message, Replies):
            return
        state = self.state
        state.in_flight -= len(message.messages)
        if state.waiting_claims:
            for reply in message.messages:
                state.waiting_claims.discard(reply.id)  # type: ignore[attr-defined]
        errors = [m.code for m in message.messages if isinstance(m, Error)]
        if errors:
            self.metrics.count_errors(errors)
        if state.in_flight < MAX_IN_FLIGHT // 2:
            state.drained.set()
        if state.closed:
            return
        if message.messages:
            try:
                self.sock.sendall(encode_frames(message.messages))
            except OSError:
                state.closed = True
        if message.close:
            self._close()

    def _close(self) -> None:
        self.state.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Session:
    """The reader's view of one connection: who it is and whether it has authenticated."""

    def __init__(self, ctx: BrokerContext, sock: socket.socket, peer: str) -> None:
        self.ctx = ctx
        self.sock = sock
        self.peer = peer
        self.authenticated = not ctx.settings.auth.enabled
        self.state = ConnectionState()
        self.actor = ConnectionActor.start(sock, peer, self.state, ctx.metrics)

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
            if isinstance(msg, _QUEUE_REQUESTS):
                to_queue.append(msg)
                if isinstance(msg, Claim) and msg.wait_ms > 0:
                    self.state.waiting_claims.add(msg.id)
            elif isinstance(msg, _REGISTRY_REQUESTS):
                self.state.in_flight += 1
                ctx.registry.tell(RegistryRequest(msg, self.actor, ctx.server.connections))
            elif isinstance(msg, Hello):
                direct.append(self._welcome(msg))
            elif isinstance(msg, Query):
                self.state.in_flight += 1
                gevent.spawn(self._query, msg)
            else:
                direct.append(msg)
        if to_queue:
            self.state.in_flight += len(to_queue)
            ctx.queue.tell(QueueRequests(to_queue, self.actor, nbytes))
        if direct:
            self._send(direct)
        return True

    def _send(self, messages: list[Message], close: bool = False) -> None:
        self.state.in_flight += len(messages)
        self.actor.tell(Replies(messages, close=close))

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
        return Welcome(id=msg.id, server=self.ctx.server_name, protocol=1,
                       heartbeat_interval_ms=int(s.worker.heartbeat_interval_secs * 1000),
                       max_batch_claim=s.broker.max_batch_claim)

    def _query(self, msg: Query) -> None:
        reply: Message
        try:
            columns, rows = self.ctx.run_query(msg.sql)
            reply = Rows(id=msg.id, columns=columns, rows=rows)
        except Exception as exc:  # QueryRefused / QueryTimeout / no history: all user-facing text
            code = getattr(exc, "code", ErrorCode.BAD_REQUEST)
            reply = Error(id=msg.id, code=code, message=getattr(exc, "message", None) or str(exc))
        try:
            self.actor.tell(Replies([reply]))
        except pykka.ActorDeadError:  # the client went away while its query ran
            pass

    def close(self) -> None:
        """Lets the actor send what it already has, then stops it; waiting claims are withdrawn."""
        if self.state.waiting_claims:
            self.ctx.queue.tell(ConnectionClosed(reply_to=self.actor))
        try:
            self.actor.stop(block=True, timeout=5.0)
        except (pykka.Timeout, pykka.ActorDeadError):
            pass


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
    idle_timeout = ctx.settings.broker.connection_timeout_secs
    sock.settimeout(idle_timeout)
    try:
        while not session.state.closed:
            try:
                data = sock.recv(RECV_BYTES)
            except TimeoutError:
                if session.state.waiting_claims:
                    continue
                log.info("closing idle connection after %s s", idle_timeout, extra={"peer": peer})
                break
            except OSError:
                break
            if not data:
                break
            try:
                frames = reader.feed(data)
            except FrameError as exc:
                session.route(exc.frames)  # type: ignore[attr-defined]
                session._send([Error(id=0, code=exc.code, message=exc.message)], close=True)
                break
            if not session.route(frames, len(data)):
                break
            if session.state.in_flight > MAX_IN_FLIGHT:
                session.state.drained.clear()
                session.state.drained.wait()
    finally:
        session.close()


def _send_and_close(sock: socket.socket, error: Error) -> None:
    try:
        sock.sendall(encode_frame(error))
    except OSError:
        pass
    finally:
        sock.close()
