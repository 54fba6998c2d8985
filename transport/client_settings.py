"""Where a client finds the broker: one `ClientSettings`, resolved the same way by the SDK, the CLI and
the worker runner.

Precedence, highest first: explicit values (flags, `connect()` arguments) > environment
(`TQ_BROKER__HOST`, `TQ_BROKER__PORT`, `TQ_API_KEY`, `TQ_TLS_CA`) > configured values (the worker's
`broker.host`/`broker.port` from its config file) > defaults (127.0.0.1:6379, no key, no TLS).
A broker's listen-on-all address (0.0.0.0, ::, empty) is dialed as 127.0.0.1. TLS is on when asked for
or when a CA file is given. The API key never appears in `repr()` (settings get logged).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transport.client import Client

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6379
LISTEN_ALL = frozenset({"0.0.0.0", "::", ""})

ENV_HOST = "TQ_BROKER__HOST"
ENV_PORT = "TQ_BROKER__PORT"
ENV_API_KEY = "TQ_API_KEY"
ENV_TLS_CA = "TQ_TLS_CA"


class ClientSettingsError(ValueError):
    """A setting that cannot be used; the message names the flag or variable and the accepted values."""


def dial_host(host: str) -> str:
    """The address a client dials for a broker configured to listen on `host`."""
    return DEFAULT_HOST if host.strip() in LISTEN_ALL else host


def _port(value: object, source: str) -> int:
    try:
        port = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ClientSettingsError(f"{source} must be a port number 1-65535, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise ClientSettingsError(f"{source} must be a port number 1-65535, got {port}")
    return port


@dataclass(frozen=True)
class ClientSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None

    @classmethod
    def resolve(cls, host: str | None = None, port: int | str | None = None, api_key: str | None = None,
                tls: bool | None = None, ca_file: str | None = None, *, env: Mapping[str, str] | None = None,
                config_host: str | None = None, config_port: int | None = None) -> ClientSettings:
        """Settings from explicit values > `env` (default os.environ) > config values > defaults.

        Empty strings count as unset. Raises ClientSettingsError for a port that is not 1-65535.
        """
        env = os.environ if env is None else env
        raw_host = host or env.get(ENV_HOST) or config_host or DEFAULT_HOST
        if port is not None and port != "":
            resolved_port = _port(port, "port (--port)")
        elif env.get(ENV_PORT):
            resolved_port = _port(env[ENV_PORT], ENV_PORT)
        else:
            resolved_port = _port(config_port or DEFAULT_PORT, "broker.port")
        key = api_key if api_key is not None else (env.get(ENV_API_KEY) or None)
        ca = ca_file or env.get(ENV_TLS_CA) or None
        return cls(host=dial_host(raw_host), port=resolved_port, api_key=key or None, tls=bool(tls or ca),
                   ca_file=ca)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, **options: Any) -> Client:
        """A `transport.client.Client` for these settings; `options` go to it (timeout, client_name, connect)."""
        return Client(self.host, self.port, api_key=self.api_key, tls=self.tls, ca_file=self.ca_file, **options)
