"""The reply side of one connection: its shared state and `ConnectionOutbox`, the address replies go to.

Every request carries its connection's `ConnectionOutbox` as `reply_to`; whoever answers (the queue
actor, the registry, a query greenlet, the connection's own reader) calls `outbox.tell(Replies(...))`.

Why not simply the ConnectionActor's ref: a reply told to the actor is one more actor hop (an inbox
put, a greenlet switch, the actor's dispatch), which sending inline saves (see
docs/performance.md#replies-sent-inline).

So when the connection has nothing queued ahead of the reply (its actor's inbox is empty and the
actor is not inside a send that had to wait), `tell` does the actor's bookkeeping and a NON-BLOCKING
send right in the caller's greenlet. If the kernel does not take it all, the rest goes to the actor as
`Unsent`, and every later reply queues behind it in the actor's inbox, so bytes keep their order. The
caller never waits on the client: only the ConnectionActor ever blocks in `sendall`.

All of this is one OS thread of cooperative greenlets (gevent monkey patching): "inbox empty and not
sending" cannot change between the check and the send, because nothing in between yields. Without
monkey patching (actors on real threads) the inline path is off and every reply takes the hop.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import gevent.event
from gevent import monkey
from msgspec import Struct

from actors.envelopes import Replies
from actors.metrics import BrokerMetrics
from transport.frames import encode_frames
from transport.messages import Error

log = logging.getLogger("tqbroker.connection")


def _send_without_waiting(sock: socket.socket, data: bytes) -> int:
    """The bytes the kernel took at once; raises BlockingIOError rather than wait when it takes none.

    `sock` is a gevent socket, whose `send` takes a third argument, a timeout (0: never wait).
    """
    gevent_send = cast("Callable[[bytes, int, float], int]", sock.send)
    return gevent_send(data, 0, 0.0)

MAX_IN_FLIGHT = 20_000  # requests routed but not yet answered; the reader pauses above this


class ConnectionState:
    """Counters shared by a connection's reader greenlet, its actor and its outbox (all on one hub).

    `waiting_claims` holds the ids of long-poll CLAIMs not yet answered: the idle timeout spares a
    connection that has one. `in_flight` bounds the requests routed but not yet answered.
    `active_at` is the monotonic time bytes last came in (or a send that had to wait completed): the
    idle sweeper compares it with the timeout.
    """

    __slots__ = ("in_flight", "waiting_claims", "closed", "drained", "active_at")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting_claims: set[int] = set()
        self.closed = False
        self.drained = gevent.event.Event()
        self.drained.set()
        self.active_at = time.monotonic()


class Unsent(Struct, gc=False):
    """The tail of a reply the kernel did not take at once: the ConnectionActor sends it, blocking."""

    data: bytes


class ConnectionOutbox:
    """Where the replies of one connection go: inline when nothing is ahead of them, else to its actor."""

    __slots__ = ("sock", "state", "metrics", "actor", "actor_urn", "sending", "inline", "_inbox", "_stopped")

    def __init__(self, sock: socket.socket, state: ConnectionState, metrics: BrokerMetrics) -> None:
        self.sock = sock
        self.state = state
        self.metrics = metrics
        self.actor: Any = None
        self.actor_urn = ""
        self.sending = False  # the actor is in a send that may yield: replies must queue behind it
        # TLS writes cannot be split into a non-blocking try and a later rest: they always take the hop.
        self.inline = monkey.is_module_patched("threading") and not isinstance(sock, ssl.SSLSocket)
        self._inbox: Any = None
        self._stopped: Any = None

    def bind(self, actor: Any) -> None:
        """Attaches the ConnectionActor (started after this outbox, which it needs)."""
        self.actor = actor
        self.actor_urn = actor.actor_urn
        self._inbox = actor.actor_inbox
        self._stopped = actor.actor_stopped

    def tell(self, message: Replies) -> None:
        """Sends `message` now if nothing is queued ahead of it, else queues it to the actor.

        Raises pykka.ActorDeadError once the connection's actor has stopped, like `ActorRef.tell`.
        """
        if (self.inline and not self.sending and not message.close and self._inbox.empty()
                and not self._stopped.is_set()):
            try:
                self.deliver(message, blocking=False)
            except Exception:  # never into the caller (it may be the queue actor): drop the connection
                log.exception("sending a reply failed; closing the connection")
                self.shutdown()
            return
        self.actor.tell(message)

    def deliver(self, message: Replies, blocking: bool) -> None:
        """The bookkeeping of answered requests, then the send. `blocking` only in the actor."""
        state = self.state
        state.in_flight -= len(message.messages)
        if state.waiting_claims:
            for reply in message.messages:
                state.waiting_claims.discard(reply.id)
        errors = [m.code for m in message.messages if isinstance(m, Error)]
        if errors:
            self.metrics.count_errors(errors)
        if state.in_flight < MAX_IN_FLIGHT // 2:
            state.drained.set()
        if state.closed:
            return
        if message.messages:
            data = encode_frames(message.messages)
            try:
                if blocking:
                    self.send_blocking(data)
                else:
                    self._send_now(data)
            except OSError:
                state.closed = True
        if message.close:
            self.shutdown()

    def _send_now(self, data: bytes) -> None:
        """One non-blocking send; what the kernel did not take goes to the actor, and so must all after it."""
        try:
            sent = _send_without_waiting(self.sock, data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.actor.tell(Unsent(data[sent:]))

    def send_blocking(self, data: bytes) -> None:
        """One plain `send` first, `sendall` only for what the kernel did not take.

        gevent's `sendall` asks the kernel for SO_SNDBUF on every call (to size its chunks) and runs
        several Python calls more; a reply is almost always taken whole by one `send`. While this may
        wait, `sending` keeps other greenlets' replies from slipping in between.
        """
        self.sending = True
        try:
            sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
                self.state.active_at = time.monotonic()  # a slow reader that reads is not idle
        finally:
            self.sending = False

    def close_with(self, error: Error) -> None:
        """Closes the connection both ways, first sending `error` if nothing is queued ahead of it and
        the kernel takes it without waiting (best effort: whoever calls this must not wait on the peer)."""
        if (self.inline and not self.sending and not self.state.closed and self._inbox is not None
                and self._inbox.empty()):
            self.metrics.count_errors([error.code])
            try:
                _send_without_waiting(self.sock, encode_frames([error]))
            except OSError:  # includes BlockingIOError: the peer is not reading
                pass
        self.shutdown()

    def shutdown(self) -> None:
        """Closes the connection both ways: the reader's `recv` and any waiting send fail at once."""
        self.state.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
