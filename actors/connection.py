"""One connection: its Session (routing, authentication, deadlines), its reply address (`actors.outbox`)
and its ConnectionActor. The reader loop that feeds the Session is `actors.reader`.

A connection has two halves on the same gevent hub. Its reader (the server's handler greenlet, in
`actors.reader.serve_connection`) decodes all frames of each `recv()` and routes them: queue-bound requests go to the
queue actor as ONE message, worker requests to the registry, HELLO and framing errors are answered
here. Every request carries the connection's `ConnectionOutbox` as its reply address: a reply with
nothing queued ahead of it leaves at once with one non-blocking send from the replying greenlet; the
others (and the rest of a partial send) go through the ConnectionActor, the only one that waits on a
slow client. Idle connections are closed by one sweeper greenlet (`actors.idle`), not socket timeouts;
the same sweeper enforces the hello and frame deadlines (`Session.sweep`).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import gevent
import pykka

from actors.browse_history import history_page
from actors.context import BrokerContext
from actors.dispatch import handles
from actors.envelopes import ConnectionClosed, QueueRequests, RegistryRequest, Replies
from actors.hub_actor import HubActor
from actors.outbox import ConnectionOutbox, ConnectionState, Unsent
from transport.frames import decode_request
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

# A frame up to this size never waits for the frame budget: at most one per connection is partial, so
# max_connections bounds their memory (64 MiB at 1,000), and a HELLO is never stuck behind big uploads.
UNBUDGETED_FRAME_BYTES = 64 * 1024
_QUEUE_REQUESTS: tuple[type[Message], ...] = (Submit, SubmitBatch, Claim, Result, Status, Cancel, *ADMIN_REQUESTS)
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

    def on_crash(self, message: Any) -> None:
        """A crash ends this connection only (actors.hub_actor's "stop" policy): the client sees it close."""
        self.outbox.shutdown()

    @handles(Replies)
    def _on_replies(self, message: Replies) -> None:
        self.outbox.deliver(message, blocking=True)

    @handles(Unsent)
    def _on_unsent(self, message: Unsent) -> None:
        if not self.outbox.state.closed:
            try:
                self.outbox.send_blocking(message.data)
            except OSError:
                self.outbox.state.closed = True


class Session:
    """The reader's view of one connection: who it is, whether it has authenticated, its deadlines.

    Deadlines (checked by the idle sweeper in `sweep`): bytes that arrive reset the idle timer, but the
    hello deadline (from the connect) and the frame deadline (from the first byte of a frame) are
    absolute: dribbling bytes do not extend them.
    """

    def __init__(self, ctx: BrokerContext, sock: socket.socket, peer: str, ip: str = "") -> None:
        self.ctx = ctx
        self.sock = sock
        self.peer = peer
        self.ip = ip or peer
        s = ctx.settings
        self.authenticated = not s.auth.enabled
        self.idle_timeout = s.broker.connection_timeout_secs
        self.hello_timeout = s.auth.hello_timeout_secs
        self.frame_timeout = s.broker.frame_timeout_secs
        self.opened_at = time.monotonic()
        self.frame_started_at = 0.0  # monotonic time the first byte of the incomplete frame came; 0: none
        self.frames_seen = 0  # complete frames received
        self.reserved = 0  # bytes of ctx.budget held by the incomplete frame
        self.waiting_budget = False  # the reader waits for ctx.budget (and enforces the frame deadline itself)
        self.queries = 0  # QUERYs in flight (api.max_queries_per_connection)
        self.state = ConnectionState()
        self.claimed = False  # a CLAIM came on this connection: the queue must hear when it closes
        self.outbox = ConnectionOutbox(sock, self.state, ctx.metrics)  # every request's reply address
        self.actor = ConnectionActor.start(self.outbox)
        self.outbox.bind(self.actor)

    @property
    def sweep_every(self) -> float:
        """The shortest of this connection's timeouts: the sweeper looks at it a few times per that."""
        return min(self.idle_timeout, self.frame_timeout, self.hello_timeout)

    def sweep(self, now: float) -> None:
        """Called by the idle sweeper: closes the connection past its hello, frame or idle deadline.

        A waiting long-poll CLAIM spares the connection from the idle timeout (not from the others).
        The shutdown wakes the reader (its `recv` fails, so the connection closes the usual way) and an
        actor stuck in `sendall` to a client that stopped reading.
        """
        state = self.state
        if state.closed:
            return
        if not self.authenticated and now - self.opened_at >= self.hello_timeout:
            self._close_for("hello", Error(id=0, code=ErrorCode.UNAUTHORIZED, message=(
                f"no valid HELLO within auth.hello_timeout_secs ({self.hello_timeout:g} s): authenticate "
                "right after connecting")))
            return
        if (self.frame_started_at and not self.waiting_budget and state.drained.is_set()
                and now - self.frame_started_at >= self.frame_timeout):
            self._close_for("frame", Error(id=0, code=ErrorCode.BAD_FRAME, message=(
                f"a frame was still incomplete broker.frame_timeout_secs ({self.frame_timeout:g} s) after its "
                "first byte: send each frame whole")))
            return
        if state.waiting_claims or now - state.active_at < self.idle_timeout:
            return
        log.info("closing idle connection after %s s", self.idle_timeout, extra={"peer": self.peer})
        self.outbox.shutdown()

    def _close_for(self, deadline: str, error: Error) -> None:
        self.ctx.metrics.connection_deadlines.labels(deadline).inc()
        self.ctx.peer_log.log(logging.WARNING, f"{deadline}-deadline {self.ip}", "closing connection: %s",
                              error.message, extra={"peer": self.peer})
        self.outbox.close_with(error)

    @property
    def evictable(self) -> bool:
        """May be closed for a newcomer at broker.max_connections: not yet authenticated (auth on), or
        (auth off) not a single complete frame received yet."""
        if self.state.closed:
            return False
        if self.ctx.settings.auth.enabled:
            return not self.authenticated
        return self.frames_seen == 0

    def evict(self, reason: str) -> None:
        """Closes this connection for a newcomer (see `evictable`), telling the peer `reason` and why it."""
        reason += (" and this one has not authenticated" if self.ctx.settings.auth.enabled
                   else " and this one has not sent a complete frame")
        self.ctx.metrics.connections_evicted.inc()
        self.ctx.peer_log.log(logging.WARNING, f"evict {self.ip}", "evicting connection: %s", reason,
                              extra={"peer": self.peer})
        self.outbox.close_with(Error(id=0, code=ErrorCode.TOO_MANY_CONNECTIONS, message=reason))

    def hold_frame(self, started: bool, need: int, now: float) -> bool:
        """Reserves budget for the incomplete frame that needs `need` bytes in all (0: header not in yet).

        `started`: a new frame began (the previous one completed, or nothing was buffered). Waits for
        budget up to the frame deadline; False when none came (the caller refuses the frame).
        """
        if started:
            self.release_frame()
            self.frame_started_at = now
        if need <= UNBUDGETED_FRAME_BYTES or self.reserved:
            return True
        budget = self.ctx.budget
        if not budget.try_reserve(need):
            self.waiting_budget = True
            try:
                granted = budget.reserve(need, self.frame_started_at + self.frame_timeout - time.monotonic())
            finally:
                self.waiting_budget = False
            if not granted:
                return False
            if self.state.closed:  # evicted or shut down meanwhile
                budget.release(need)
                return True
        self.reserved = need
        return True

    def release_frame(self) -> None:
        """No frame is being received any more: its deadline and its budget end."""
        self.frame_started_at = 0.0
        if self.reserved:
            self.ctx.budget.release(self.reserved)
            self.reserved = 0

    def route(self, frames: list[tuple[int, bytes]], nbytes: int = 0) -> bool:
        """Routes decoded frames; False when the connection must close (failed authentication)."""
        ctx = self.ctx
        direct: list[Message] = []
        to_queue: list[Message] = []
        for type_byte, payload in frames:
            msg = decode_request(type_byte, payload)
            if not self.authenticated:
                if not self._authenticate(msg, direct):
                    self._send(direct, close=True)
                    return False
                continue
            if isinstance(msg, Browse) and msg.state in HISTORY_STATES:  # read from task_history, not memory
                self._start_query(msg, direct)
            elif isinstance(msg, _QUEUE_REQUESTS):
                to_queue.append(msg)
                if isinstance(msg, Claim):
                    self.claimed = True
                    if msg.wait_ms > 0:
                        self.state.waiting_claims.add(msg.id)
            elif isinstance(msg, _REGISTRY_REQUESTS):
                self.state.in_flight += 1
                ctx.registry.tell(RegistryRequest(msg, self.outbox, ctx.server.connections))
            elif isinstance(msg, Hello):
                direct.append(self._welcome(msg))
            elif isinstance(msg, Query):
                self._start_query(msg, direct)
            else:
                direct.append(msg)
        if to_queue:
            self.state.in_flight += len(to_queue)
            ctx.queue.tell(QueueRequests(to_queue, self.outbox, nbytes))
        if direct:
            self._send(direct)
        return True

    def refuse(self, error: Error) -> None:
        """Answers `error` after every reply already due on this connection, then closes it."""
        self._send([error], close=True)

    def _send(self, messages: list[Message], close: bool = False) -> None:
        self.state.in_flight += len(messages)
        self.outbox.tell(Replies(messages, close=close))

    def _authenticate(self, msg: Message, direct: list[Message]) -> bool:
        """With auth enabled, the first frame must be a HELLO carrying a valid key."""
        if not isinstance(msg, Hello):
            self.auth_failed()
            direct.append(Error(id=msg.id, code=ErrorCode.UNAUTHORIZED,
                                message="authentication required: the first frame must be a valid HELLO with "
                                        "an api_key"))
            return False
        if not self.ctx.keys.accepts(msg.api_key):
            self.auth_failed()
            direct.append(Error(id=msg.id, code=ErrorCode.UNAUTHORIZED, message="invalid api_key"))
            return False
        self.authenticated = True
        direct.append(self._welcome(msg))
        return True

    def auth_failed(self) -> None:
        """Counts a failed authentication and logs it, at most 10 lines per peer IP per 10 s; never the key."""
        self.ctx.metrics.auth_failures.inc()
        self.ctx.peer_log.log(logging.WARNING, f"auth {self.ip}", "authentication failed", extra={"peer": self.peer})

    def _welcome(self, msg: Hello) -> Message:
        if msg.protocol != 1:
            return Error(id=msg.id, code=ErrorCode.BAD_REQUEST,
                         message=f"protocol {msg.protocol} is not supported; this broker speaks protocol 1")
        s = self.ctx.settings
        return Welcome(id=msg.id, server=self.ctx.server_name, protocol=1, version=PROTOCOL_VERSION,
                       heartbeat_interval_ms=int(s.worker.heartbeat_interval_secs * 1000),
                       max_batch_claim=s.broker.max_batch_claim)

    def _start_query(self, msg: Query | Browse, direct: list[Message]) -> None:
        limit = self.ctx.settings.api.max_queries_per_connection
        if self.queries >= limit:
            direct.append(Error(id=msg.id, code=ErrorCode.QUEUE_FULL, message=(
                f"this connection already has {limit} QUERYs in flight (api.max_queries_per_connection): "
                "wait for an answer, then retry")))
            return
        self.queries += 1
        self.state.in_flight += 1
        gevent.spawn(self._query, msg)

    def _query(self, msg: Query | Browse) -> None:
        reply: Message | None = None
        try:
            with self.ctx.queries.slot(self):
                if self.state.closed:  # the client went away while its query waited: skip the work
                    return
                if isinstance(msg, Browse):
                    reply = history_page(self.ctx.run_query, msg)
                else:
                    result = self.ctx.run_query(msg.sql)
                    reply = Rows(id=msg.id, columns=result.columns, rows=result.rows, truncated=result.truncated)
        except Exception as exc:  # QueryRefused / QueryTimeout / no history: all user-facing text
            code = getattr(exc, "code", ErrorCode.BAD_REQUEST)
            reply = Error(id=msg.id, code=code, message=getattr(exc, "message", None) or str(exc))
        finally:
            self.queries -= 1
        if reply is None:
            return
        try:
            self.outbox.tell(Replies([reply]))
        except pykka.ActorDeadError:  # the client went away while its query ran
            pass

    def close(self) -> None:
        """Lets the actor send what it already has, then stops it; waiting claims are withdrawn."""
        if self.state.waiting_claims or self.claimed:
            self.ctx.queue.tell(ConnectionClosed(reply_to=self.outbox))
        try:
            self.actor.stop(block=True, timeout=5.0)
        except (pykka.Timeout, pykka.ActorDeadError):
            pass
