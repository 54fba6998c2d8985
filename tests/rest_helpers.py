"""An HTTP client for the REST tests: one keep-alive connection, JSON in and out."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from tests.conftest import BrokerProcess, free_port
from tests.helpers import wait_for


def rest_broker(make_broker: Any, **env: str) -> tuple[BrokerProcess, int]:
    """A broker with the REST API on a free loopback port; returns it and the port."""
    port = free_port()
    broker = make_broker(**{"TQ_API__REST_PORT": str(port), "TQ_API__REST_HOST": "127.0.0.1", **env})
    wait_for(lambda: _listening(port), timeout=30)  # the TCP port listens before recovery; REST after it
    return broker, port


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Http:
    def __init__(self, port: int, key: str | None = None, host: str = "127.0.0.1") -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.key = key

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body or text)."""
        sent = dict(headers or {})
        if self.key is not None:
            sent["Authorization"] = f"Bearer {self.key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        self.conn.request(method, path, body=data, headers=sent)
        resp = self.conn.getresponse()
        payload = resp.read()
        self.last_headers = {k.lower(): v for k, v in resp.getheaders()}
        if payload and resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(payload)
        return resp.status, payload.decode(errors="replace")

    def close(self) -> None:
        self.conn.close()
