"""A connection's reply path (`actors.outbox`) and the idle sweeper (`actors.idle`), without a broker.

The outbox sends a reply inline only when nothing is queued ahead of it in the connection actor; these
tests drive it over a real gevent socket pair with a stand-in for the actor's ref (its inbox and stopped
flag are what the outbox looks at), and check the one property that matters: the bytes on the wire
are the replies in the order they were told, whichever way each one went.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import gevent.queue
import gevent.socket
import msgspec
import pykka
import pytest

from actors.connection import ConnectionActor
from actors.envelopes import Replies
from actors.idle import IdleSweeper
from actors.metrics import BrokerMetrics
from actors.outbox import ConnectionOutbox, ConnectionState, Unsent
from transport.frames import FrameReader, encode_frames
from transport.messages import Error, ErrorCode, Message, Ok

WAIT = 5.0  # upper bound for a socket read in these tests; reads end as soon as bytes arrive


class FakeActorRef:
    """What the outbox uses of a pykka ActorRef: urn, inbox, stopped flag, and `tell`."""

    actor_urn = "urn:uuid:fake-connection"

    def __init__(self) -> None:
        self.actor_inbox: gevent.queue.SimpleQueue = gevent.queue.SimpleQueue()
        self.actor_stopped = gevent.event.Event()

    def tell(self, message: Any) -> None:
        if self.actor_stopped.is_set():
            raise pykka.ActorDeadError("stopped")
        self.actor_inbox.put(message)


class Wire:
    def __init__(self) -> None:
        self.broker_side, self.client_side = gevent.socket.socketpair()
        self.client_side.settimeout(WAIT)
        self.state = ConnectionState()
        self.outbox = ConnectionOutbox(self.broker_side, self.state, BrokerMetrics())
        self.outbox.inline = True  # this test process is not monkey patched, but runs on one hub
        self.ref = FakeActorRef()
        self.outbox.bind(self.ref)

    def tell(self, *messages: Message) -> None:
        self.state.in_flight += len(messages)
        self.outbox.tell(Replies(list(messages)))

    def read_bytes(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.client_side.recv(1 << 20)
            assert chunk, "the connection closed early"
            data += chunk
        return data

    def nothing_sent(self) -> bool:
        self.client_side.setblocking(False)
        try:
            self.client_side.recv(1)
        except BlockingIOError:
            return True
        finally:
            self.client_side.settimeout(WAIT)
        return False

    def run_actor(self) -> None:
        """What the ConnectionActor's loop does with what was queued to it."""
        actor = ConnectionActor(self.outbox)
        while not self.ref.actor_inbox.empty():
            actor.on_receive(self.ref.actor_inbox.get())


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.broker_side.close()
    w.client_side.close()


def frames_of(data: bytes) -> list[int]:
    return [msgspec.msgpack.decode(payload)["id"] for _, payload in FrameReader(1 << 28).feed(data)]


def test_a_reply_with_nothing_ahead_of_it_is_sent_at_once_without_the_actor(wire: Wire) -> None:
    wire.tell(Ok(id=1))
    assert wire.ref.actor_inbox.empty()
    assert frames_of(wire.read_bytes(len(encode_frames([Ok(id=1)])))) == [1]
    assert wire.state.in_flight == 0


def test_a_reply_queues_behind_what_the_actor_has_not_sent_yet(wire: Wire) -> None:
    wire.state.in_flight += 1
    wire.ref.tell(Replies([Ok(id=1)]))
    wire.tell(Ok(id=2))
    assert wire.ref.actor_inbox.qsize() == 2 and wire.nothing_sent()
    wire.run_actor()
    assert frames_of(wire.read_bytes(2 * len(encode_frames([Ok(id=1)])))) == [1, 2]
    assert wire.state.in_flight == 0


def test_a_reply_while_the_actor_is_in_a_send_goes_to_the_actor(wire: Wire) -> None:
    wire.outbox.sending = True
    wire.tell(Ok(id=1))
    assert wire.ref.actor_inbox.qsize() == 1 and wire.nothing_sent()


def test_what_the_kernel_did_not_take_goes_to_the_actor_and_later_replies_keep_their_order(wire: Wire) -> None:
    wire.broker_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = Error(id=1, code=ErrorCode.INTERNAL, message="x" * 4_000_000)
    small = Ok(id=2)
    wire.tell(big)
    queued = [wire.ref.actor_inbox.peek()]
    assert isinstance(queued[0], Unsent), "a 4 MB reply went out whole on a 4 KiB send buffer"
    wire.tell(small)
    assert wire.ref.actor_inbox.qsize() == 2
    actor = gevent.spawn(wire.run_actor)
    expected = encode_frames([big]) + encode_frames([small])
    assert wire.read_bytes(len(expected)) == expected
    actor.join(WAIT)
    assert wire.state.in_flight == 0 and not wire.outbox.sending


def test_a_stopped_connection_refuses_replies_like_an_actor_ref(wire: Wire) -> None:
    wire.ref.actor_stopped.set()
    with pytest.raises(pykka.ActorDeadError):
        wire.tell(Ok(id=1))


def test_a_reply_that_fails_inline_closes_the_connection_instead_of_raising_in_the_caller(wire: Wire) -> None:
    wire.outbox.tell(Replies([object()]))  # type: ignore[list-item]  # cannot be encoded
    assert wire.state.closed
    assert wire.client_side.recv(1) == b""


class Recorder:
    def __init__(self) -> None:
        self.swept = gevent.event.Event()
        self.times: list[float] = []

    def sweep(self, now: float) -> None:
        self.times.append(now)
        self.swept.set()


def test_the_idle_sweeper_looks_at_every_watched_connection_and_stops_when_none_is_left() -> None:
    sweeper = IdleSweeper()
    first, second = Recorder(), Recorder()
    sweeper.watch(first, 0.1)
    sweeper.watch(second, 0.1)
    running = sweeper._greenlet
    assert running is not None
    assert first.swept.wait(WAIT) and second.swept.wait(WAIT)
    sweeper.unwatch(first)
    sweeper.unwatch(second)
    running.join(WAIT)
    assert running.dead and sweeper._greenlet is None
    seen = len(first.times)
    third = Recorder()
    sweeper.watch(third, 0.1)  # a new connection starts it again
    assert third.swept.wait(WAIT)
    assert len(first.times) == seen
    sweeper.unwatch(third)
