"""Who may read the HTTP endpoints (/metrics, /healthz, /readyz): the protocol port's protected mode.

- A loopback peer is always served.
- With `auth.enabled`, another peer needs `Authorization: Bearer <api key>` (a key of `auth.api_keys`,
  compared like HELLO's) for /metrics; /healthz and /readyz answer without one, so Kubernetes probes
  need no secret (they tell only whether the broker is up and ready, and why not).
- With auth off, another peer is refused (403) unless `auth.allow_unauthenticated_remote: true`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.context import ApiKeys, is_loopback
from config.settings import AuthSettings

PROBES = frozenset({"/healthz", "/readyz"})
Refusal = tuple[str, list[tuple[str, str]], str]  # HTTP status, extra headers, message
Guard = Callable[[dict[str, Any]], "Refusal | None"]


def http_guard(auth: AuthSettings, keys: ApiKeys) -> Guard:
    """A function from a WSGI environ to why it is refused, or None when it may be served."""

    def refusal(environ: dict[str, Any]) -> Refusal | None:
        if is_loopback((environ.get("REMOTE_ADDR") or "", 0)):
            return None
        if auth.enabled:
            if environ.get("PATH_INFO") in PROBES or _bearer_key_accepted(environ, keys):
                return None
            return ("401 Unauthorized", [("WWW-Authenticate", 'Bearer realm="tqbroker"')],
                    "this endpoint needs Authorization: Bearer <api key> (a key of auth.api_keys) from "
                    "outside this machine")
        if auth.allow_unauthenticated_remote:
            return None
        return ("403 Forbidden", [],
                "protected mode: the HTTP endpoints answer only this machine unless auth.enabled (then with "
                "Authorization: Bearer <api key>) or auth.allow_unauthenticated_remote: true")

    return refusal


def remote_policy(auth: AuthSettings) -> str:
    """One phrase for the start-up log line: what a peer on another machine gets."""
    if auth.enabled:
        return "remote clients need Authorization: Bearer <api key> for /metrics; /healthz and /readyz are open"
    if auth.allow_unauthenticated_remote:
        return "remote clients are served without a key (auth.allow_unauthenticated_remote)"
    return "remote clients are refused (protected mode; auth.enabled opens /metrics to bearer keys)"


def _bearer_key_accepted(environ: dict[str, Any], keys: ApiKeys) -> bool:
    scheme, _, key = (environ.get("HTTP_AUTHORIZATION") or "").partition(" ")
    return scheme.lower() == "bearer" and keys.accepts(key.strip() or None)
