"""The HTTP side's reply address and the one way HTTP handlers reach the actors (`Gateway`).

An HTTP request sends the SAME typed messages to the SAME owners as a TCP connection does
(`actors.connection.Session.route`): queue requests to the queue actor, worker requests to the
registry. The owner answers by `reply_to.tell(Replies([...]))` (`actors.answers.send_replies`), keyed
by `reply_to.actor_urn`; an `HttpReply` offers exactly that and wakes the waiting HTTP greenlet. Nothing
here blocks an actor: the HTTP greenlet waits on its own AsyncResult with a timeout.
"""

from __future__ import annotations

import itertools
from typing import Any

import pykka
from gevent.event import AsyncResult
from gevent.timeout import Timeout

from actors.envelopes import ConnectionClosed, QueueRequests, RegistryRequest, Replies
from transport.messages import Claim, Error, ErrorCode, Message

REQUEST_ID = 1  # one request per reply address, so the id only has to be a valid U32
REPLY_TIMEOUT_S = 10.0  # an answer later than this is reported as 503; the change may still happen
CLAIM_MARGIN_S = 5.0  # a long-poll CLAIM waits wait_ms plus this for the queue's empty ASSIGNED

_serials = itertools.count(1)


class HttpReply:
    """The reply address of one HTTP request: a unique `actor_urn` and a `tell` that fills an AsyncResult."""

    __slots__ = ("actor_urn", "result")

    def __init__(self) -> None:
        self.actor_urn = f"http-{next(_serials)}"
        self.result: AsyncResult = AsyncResult()

    def tell(self, message: Replies) -> None:
        """Called by the owner (queue actor, registry, a query greenlet); never blocks."""
        if message.messages and not self.result.ready():
            self.result.set(message.messages[0])

    def wait(self, timeout: float) -> Message | None:
        try:
            return self.result.get(timeout=timeout)
        except Timeout:
            return None


class Gateway:
    """Sends one request to its owner actor and waits (in the HTTP greenlet only) for the answer.

    Returns the reply message, or an `Error` (SHUTTING_DOWN when the actor is gone, INTERNAL on a
    timeout); never raises for a broker-side failure.
    """

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def queue(self, request: Message, nbytes: int = 0) -> Message:
        reply = HttpReply()
        timeout = REPLY_TIMEOUT_S
        if isinstance(request, Claim) and request.wait_ms > 0:
            timeout = min(request.wait_ms, 60_000) / 1000 + CLAIM_MARGIN_S
        if not self._tell(self.ctx.queue, QueueRequests([request], reply, nbytes)):
            return _gone()
        answer = reply.wait(timeout)
        if answer is None:
            if isinstance(request, Claim):  # nobody will take what it would be given now
                self._tell(self.ctx.queue, ConnectionClosed(reply_to=reply))
            return _late()
        return self._counted(answer)

    def registry(self, request: Message) -> Message:
        reply = HttpReply()
        connections = getattr(self.ctx.server, "connections", 0)
        if not self._tell(self.ctx.registry, RegistryRequest(request, reply, connections)):
            return _gone()
        answer = reply.wait(REPLY_TIMEOUT_S)
        return _late() if answer is None else self._counted(answer)

    def _counted(self, answer: Message) -> Message:
        if isinstance(answer, Error):
            self.ctx.metrics.count_errors([answer.code])
        return answer

    @staticmethod
    def _tell(actor: Any, message: Any) -> bool:
        if actor is None:
            return False
        try:
            actor.tell(message)
        except pykka.ActorDeadError:
            return False
        return True


def _gone() -> Error:
    return Error(id=REQUEST_ID, code=ErrorCode.SHUTTING_DOWN,
                 message="broker is starting or shutting down; retry in a moment")


def _late() -> Error:
    return Error(id=REQUEST_ID, code=ErrorCode.INTERNAL,
                 message=f"the broker did not answer within {REPLY_TIMEOUT_S:g} s; it may be overloaded, retry "
                         "(a change may have been applied: check with GET /api/v1/tasks/{id})")
