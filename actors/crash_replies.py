"""What the queue actor answers once it has crashed (see `actors.hub_actor`, "Supervision").

Pure functions from the crashing message, its unsent replies and the waiting CLAIMs to error replies:
the crash path never sends the crashing message's own replies (its changes were applied in memory but
never written to the WAL, so they were not acknowledged), and no client is left waiting.
"""

from __future__ import annotations

from typing import Any

from actors.answers import PendingReplies
from actors.envelopes import QueueRequests
from actors.waiters import ClaimWaiters
from transport.messages import Error, ErrorCode

STOPPING = "broker is stopping after an internal error (see its log); retry once it has restarted"


def _requests_of(message: Any) -> tuple[Any, list[int]] | None:
    """(reply address, request ids) of a message that expects answers, or None."""
    if isinstance(message, QueueRequests):
        return message.reply_to, [request.id for request in message.requests]
    reply_to = getattr(message, "reply_to", None)
    if reply_to is not None and hasattr(message, "request_id"):
        return reply_to, [message.request_id]
    return None


def crash_replies(message: Any, unsent: PendingReplies, waiters: ClaimWaiters, reason: str) -> PendingReplies:
    """INTERNAL for every request the crashing `message` carried or had answered in `unsent`, and
    SHUTTING_DOWN for every waiting CLAIM (each waiter is marked done)."""
    owed: dict[str, tuple[Any, dict[int, None]]] = {}  # connection -> (reply address, request ids, in order)

    def owe(reply_to: Any, request_id: int) -> None:
        owed.setdefault(reply_to.actor_urn, (reply_to, {}))[1][request_id] = None

    for reply_to, replies in unsent.values():
        for reply in replies:
            owe(reply_to, reply.id)
    carried = _requests_of(message)
    if carried is not None:
        for request_id in carried[1]:
            owe(carried[0], request_id)
    text = f"internal error, the request was not applied ({reason}); retry once the broker has restarted"
    out: PendingReplies = {key: (reply_to, [Error(id=i, code=ErrorCode.INTERNAL, message=text) for i in ids])
                   for key, (reply_to, ids) in owed.items()}
    for waiter in waiters.waiting:
        if not waiter.done:
            waiter.done = True
            error = Error(id=waiter.request_id, code=ErrorCode.SHUTTING_DOWN, message=STOPPING)
            out.setdefault(waiter.reply_to.actor_urn, (waiter.reply_to, []))[1].append(error)
    return out


def refusals_after_crash(message: Any) -> PendingReplies | None:
    """SHUTTING_DOWN for every request a message to the crashed actor carries; None if it carries none."""
    carried = _requests_of(message)
    if carried is None:
        return None
    reply_to, ids = carried
    return {"": (reply_to, [Error(id=i, code=ErrorCode.SHUTTING_DOWN, message=STOPPING) for i in ids])}
