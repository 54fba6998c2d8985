"""What every connection needs to know of the running broker, gathered in one read-only object."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.idle import IdleSweeper
from actors.metrics import BrokerMetrics
from config.settings import Settings


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

    def refuse_peer(self, address: Any) -> str | None:
        """Protected mode: without auth, only loopback peers may connect unless explicitly allowed."""
        auth = self.settings.auth
        if auth.enabled or auth.allow_unauthenticated_remote or is_loopback(address):
            return None
        return ("protected mode: connections from outside this machine need auth.enabled with "
                "auth.api_keys (or auth.allow_unauthenticated_remote: true)")
