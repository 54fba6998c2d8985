"""Exceptions of the Python client: one class per protocol error code, plus the client-side failures.

Callers branch on failures (a worker treats NOT_LEASED as "someone else has it now", a producer backs
off on QUEUE_FULL), so each error code is its own class rather than a string to compare. Failures that
the broker did not answer (it is down, the connection dropped, no reply in time) are deliberately *not*
`BrokerError`s: retrying those is a transport decision, retrying a `BrokerError` is an application one.
"""

from __future__ import annotations

from transport.messages import Error, ErrorCode


class BrokerError(Exception):
    """The broker answered a request with `ERROR{code, message}`.

    `request_id` is the id the ERROR carried: 0 when it answered no parseable request (then every
    request pending on that connection fails with it).
    """

    code: str = ""

    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        # All three go to args so copy.copy() and pickling rebuild the exception faithfully.
        super().__init__(code, message, request_id)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadFrame(BrokerError):
    code = ErrorCode.BAD_FRAME


class FrameTooLarge(BrokerError):
    code = ErrorCode.FRAME_TOO_LARGE


class UnknownType(BrokerError):
    code = ErrorCode.UNKNOWN_TYPE


class BadRequest(BrokerError):
    code = ErrorCode.BAD_REQUEST


class Unauthorized(BrokerError):
    code = ErrorCode.UNAUTHORIZED


class QueueFull(BrokerError):
    code = ErrorCode.QUEUE_FULL


class NotFound(BrokerError):
    code = ErrorCode.NOT_FOUND


class InvalidState(BrokerError):
    code = ErrorCode.INVALID_STATE


class NotLeased(BrokerError):
    code = ErrorCode.NOT_LEASED


class TooManyConnections(BrokerError):
    code = ErrorCode.TOO_MANY_CONNECTIONS


class ShuttingDown(BrokerError):
    code = ErrorCode.SHUTTING_DOWN


class InternalError(BrokerError):
    code = ErrorCode.INTERNAL


class Unavailable(BrokerError):
    """v1.1: the broker could not read task history just now (its database is restarting or stalled);
    the task may well exist. Retry later."""

    code = ErrorCode.UNAVAILABLE


ERROR_CLASSES: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (BadFrame, FrameTooLarge, UnknownType, BadRequest, Unauthorized, QueueFull, NotFound,
                InvalidState, NotLeased, TooManyConnections, ShuttingDown, InternalError, Unavailable)
}


def error_from_reply(reply: Error) -> BrokerError:
    """The exception for an ERROR frame; a code this client does not know yet maps to `BrokerError`
    itself, so a newer broker's codes still surface with their message instead of crashing the reader."""
    return ERROR_CLASSES.get(reply.code, BrokerError)(reply.code, reply.message, reply.id)


class ClientError(ConnectionError):
    """The request got no answer from the broker because of the connection (not the broker's verdict)."""


class BrokerUnreachable(ClientError):
    """Dialing the broker failed: refused, unreachable, name not resolved, or the TLS handshake failed."""


class ConnectionLost(ClientError):
    """The connection dropped (or was closed) with the request unanswered; the client does not redial by
    itself because whether a request may be re-sent is the caller's call (SUBMIT is not idempotent)."""


class ProtocolError(ClientError):
    """The broker answered with a frame type that does not fit the request: a contract violation."""


class RequestTimeout(TimeoutError):
    """No reply within the timeout. The connection stays usable; a late reply is dropped."""
