"""Who may do what over HTTP: protected mode, API keys, read-only keys, and the same-origin rule.

Ensures, before any resource runs:
- a peer the TCP port would refuse (protected mode, `BrokerContext.refuse_peer`) gets 401;
- with `auth.enabled`, the key comes from `Authorization: Bearer KEY` or the dashboard's HttpOnly
  cookie; a key from `auth.api_keys` may do everything, one from `auth.read_only_api_keys` may only
  read (GET, and the read-only SQL query), anything else is 401 (the dashboard redirects to /login);
- a change (any method but GET/HEAD) whose Origin or Referer names another host is 403, and a
  dashboard change (cookie-authenticated forms) must name this host in one of them.
Keys are compared in constant time (`ApiKeys`) and never logged.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import falcon

from actors.context import ApiKeys, BrokerContext
from actors.http.errors import FORBIDDEN
from actors.http.schemas import ApiError
from transport.messages import ErrorCode

log = logging.getLogger("tqbroker.http")

COOKIE = "tq_api_key"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRITE, READ = "write", "read"
PEER_CACHE = 4096  # peer addresses whose protected-mode answer is remembered


class Guard:
    """Falcon middleware. Resources may set `public = True` (login, static) and
    `reads_only = True` (a POST that changes nothing, e.g. the SQL query)."""

    def __init__(self, ctx: BrokerContext) -> None:
        self.ctx = ctx
        self.read_only = ApiKeys(ctx.settings.auth.read_only_api_keys)
        self._refusals: dict[str, str | None] = {}  # peer address -> refusal; settings are fixed for the run

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        address = req.remote_addr
        if address not in self._refusals:
            if len(self._refusals) >= PEER_CACHE:
                self._refusals.clear()
            self._refusals[address] = self.ctx.refuse_peer((address, 0))
        refusal = self._refusals[address]
        if refusal is not None:
            log.warning("HTTP request refused: %s", refusal, extra={"peer": req.remote_addr})
            raise ApiError(ErrorCode.UNAUTHORIZED, refusal)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any, params: Any) -> None:
        if resource is None:
            return
        changes = req.method not in SAFE_METHODS and not getattr(resource, "reads_only", False)
        dashboard = getattr(resource, "dashboard", False)
        if req.method not in SAFE_METHODS:
            self._same_origin(req, required=dashboard)
        if getattr(resource, "public", False):
            return
        role = self.role(req)
        req.context.role = role
        if role is None:
            if dashboard and req.method in SAFE_METHODS:
                raise falcon.HTTPSeeOther("/login")
            raise ApiError(ErrorCode.UNAUTHORIZED, "authentication required: send Authorization: Bearer <api key> "
                                                   "(a key from auth.api_keys or auth.read_only_api_keys)")
        if changes and role == READ:
            raise ApiError(FORBIDDEN, "this API key is read-only (auth.read_only_api_keys): it may read, not change")

    def role(self, req: falcon.Request) -> str | None:
        """WRITE, READ, or None (no acceptable key); everyone writes while auth is off."""
        if not self.ctx.settings.auth.enabled:
            return WRITE
        key = _bearer(req.get_header("Authorization")) or req.cookies.get(COOKIE)
        if key is None:
            return None
        if self.ctx.keys.accepts(key):
            return WRITE
        if self.read_only.accepts(key):
            return READ
        log.warning("HTTP authentication failed", extra={"peer": req.remote_addr})
        return None

    @staticmethod
    def _same_origin(req: falcon.Request, required: bool) -> None:
        source = req.get_header("Origin") or req.get_header("Referer")
        host = req.get_header("Host") or ""
        if source is None:
            if required:
                raise ApiError(FORBIDDEN, "a dashboard change needs an Origin or Referer header naming this host")
            return
        if source == "null" or urlsplit(source).netloc.lower() != host.lower():
            raise ApiError(FORBIDDEN, f"cross-origin change refused: {source[:200]} is not {host[:200]}")


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None
