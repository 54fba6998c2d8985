"""The one table from protocol error codes to HTTP statuses, and the `{"error": {...}}` body.

Every error the REST API and the dashboard's JSON answers carry is `ErrorOut`
(`{"error": {"code", "message"}}`, docs/protocol.md "REST API"), whether a handler raised `ApiError`,
an actor answered `Error`, or Falcon refused the request (unknown route, wrong method).
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import msgspec

from actors.http.schemas import ApiError, ErrorBody, ErrorOut
from transport.messages import ErrorCode

log = logging.getLogger("tqbroker.http")

FORBIDDEN = "FORBIDDEN"  # REST only (protocol v1.1): a read-only key, or a cross-origin change

STATUS: dict[str, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.NOT_LEASED: 409,
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.TOO_MANY_CONNECTIONS: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.INTERNAL: 503,
    ErrorCode.UNAVAILABLE: 503,  # v1.1: history cannot be read right now; retry
}
_CODE_OF_STATUS = {401: ErrorCode.UNAUTHORIZED, 403: FORBIDDEN, 404: ErrorCode.NOT_FOUND,
                   413: ErrorCode.FRAME_TOO_LARGE}

_encode = msgspec.json.Encoder().encode


def error_body(code: str, message: str) -> bytes:
    return _encode(ErrorOut(error=ErrorBody(code=code, message=message)))


def write_error(resp: falcon.Response, code: str, message: str) -> None:
    resp.status = STATUS.get(code, 400)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(code, message)
    if code == ErrorCode.UNAUTHORIZED:
        resp.set_header("WWW-Authenticate", 'Bearer realm="tqbroker"')


def on_api_error(req: falcon.Request, resp: falcon.Response, exc: ApiError, params: Any) -> None:
    write_error(resp, exc.code, exc.message)


def on_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: Any) -> None:
    """Falcon's own refusals (no such route, method not allowed, ...) in our error format."""
    code = _CODE_OF_STATUS.get(exc.status_code, ErrorCode.BAD_REQUEST)
    message = exc.description or exc.title or "bad request"
    if exc.status_code == 404:
        message = f"no such page or API route: {req.path}"
    resp.status = exc.status_code
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(code, message)
    if exc.headers:
        resp.set_headers(exc.headers)


def on_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any) -> None:
    log.exception("HTTP %s %s failed", req.method, req.path)
    resp.status = 500
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(ErrorCode.INTERNAL, "the broker failed on this request; see its log")


def install(app: falcon.App) -> None:
    app.add_error_handler(Exception, on_unexpected)
    app.add_error_handler(falcon.HTTPError, on_http_error)
    app.add_error_handler(ApiError, on_api_error)
