"""What every connection needs to know of the running broker, gathered in one read-only object."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.idle import IdleSweeper
from actors.metrics import BrokerMetrics
from actors.queries import QueryGate
from actors.ratelog import RateLimitedLog
from config.settings import Settings
from transport.budget import FrameBudget


class ApiKeys:
    """The accepted API keys: plaintext or `sha256:<hex>` entries, compared in constant time."""

    def __init__(self, entries: tuple[str, ...] | list[str]) -> None:
        self._digests = [_digest_of(entry) for entry in entries]

    def accepts(self, key: str | None) -> bool:
        if key is None:
            return False
        digest = hashlib.sha256(key.encode()).digest()
        matched = False
        for accepted in self._digests:  # no early exit: every entry is compared
            matched |= hmac.compare_digest(digest, accepted)
        return matched


def _digest_of(entry: str) -> bytes:
    if entry[:7].lower() == "sha256:":
        return bytes.fromhex(entry[7:])
    return hashlib.sha256(entry.encode()).digest()


def is_loopback(address: Any) -> bool:
    """Whether a peer address is on this machine (127.0.0.0/8, ::1, or IPv4-mapped loopback)."""
    if not isinstance(address, tuple):
        return True  # a Unix socket
    try:
        ip = ipaddress.ip_address(address[0].split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass
class BrokerContext:
    settings: Settings
    queue: Any
    registry: Any
    server: Any  # has `.connections`
    keys: ApiKeys
    run_query: Callable[[str], Any]  # -> storage.errors.QueryResult
    metrics: BrokerMetrics
    server_name: str = "tqbroker/0.1.0"
    idle: IdleSweeper = field(default_factory=IdleSweeper, repr=False)  # closes idle connections
    budget: FrameBudget = field(init=False, repr=False)  # broker.max_inflight_frame_bytes, all connections
    queries: QueryGate = field(init=False, repr=False)  # QUERYs running in the database at once
    # warnings an attacker can trigger at will (failed HELLOs, deadlines, refusals): 10 lines per kind and IP per 10 s
    peer_log: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(logging.getLogger("tqbroker.connection")),
                                     repr=False)

    def __post_init__(self) -> None:
        self.budget = FrameBudget(self.settings.broker.max_inflight_frame_bytes)
        self.queries = QueryGate(self.settings.api.max_concurrent_queries)

    def refuse_peer(self, address: Any) -> str | None:
        """Protected mode: without auth, only loopback peers may connect unless explicitly allowed."""
        auth = self.settings.auth
        if auth.enabled or auth.allow_unauthenticated_remote or is_loopback(address):
            return None
        return ("protected mode: connections from outside this machine need auth.enabled with "
                "auth.api_keys (or auth.allow_unauthenticated_remote: true)")
