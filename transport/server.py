"""The TCP listener: a gevent StreamServer with a connection limit and a clear error for a busy port.

It knows frames, not actors: each accepted socket is handed to `handle(sock, address)` in its own
greenlet. When `max_connections` are open, a newcomer first makes room by evicting the oldest tracked
connection that says it is `evictable` (not yet authenticated; see `actors.connection`); only if none
is, it is answered `ERROR{id: 0, TOO_MANY_CONNECTIONS}` and closed, and the others are unaffected.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from gevent.server import StreamServer

from transport.frames import encode_frame
from transport.messages import Error, ErrorCode

log = logging.getLogger("tqbroker.server")


class ConnectionHandle(Protocol):
    """What the server needs of a connection to make room for a newcomer."""

    @property
    def evictable(self) -> bool:
        """Whether this connection may be closed to let a new one in (it has not proven itself yet)."""

    def evict(self, reason: str) -> None:
        """Closes the connection now, telling the peer `reason`; it leaves `untrack` on its way out."""


class ListenError(Exception):
    """The server could not listen; the message says on what and why, in one line."""


class TcpServer:
    def __init__(
        self, host: str, port: int, handle: Callable[[socket.socket, Any], None], max_connections: int,
        ssl_context: ssl.SSLContext | None = None, handshake_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self._handle = handle
        self.max_connections = max_connections
        self.connections = 0
        self._tracked: dict[ConnectionHandle, None] = {}  # insertion order = oldest first
        self._evicted: set[ConnectionHandle] = set()  # closed for room but not gone yet
        self.ssl_context = ssl_context
        self.handshake_timeout_s = handshake_timeout_s
        # TLS is wrapped in _accept, not by StreamServer: the handshake then counts against the limit,
        # has a timeout, and a failed one is one log line instead of a gevent traceback.
        self._server = StreamServer((host, port), self._accept)

    def bind(self) -> None:
        """Binds and listens (before recovery, so a busy port fails fast); raises ListenError."""
        try:
            self._server.init_socket()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"port {self.port} on {self.host} is already in use: stop the other process or choose "
                    "another port (--port or TQ_BROKER__PORT)"
                ) from None
            raise ListenError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._server.server_port

    def serve(self) -> None:
        """Starts accepting: connections queued in the backlog meanwhile are served from now on."""
        self._server.start()

    def stop_accepting(self) -> None:
        """Closes the listening socket; open connections carry on until they are closed."""
        self._server.close()

    def track(self, handle: ConnectionHandle) -> None:
        """Registers an open connection as a candidate for eviction (see `ConnectionHandle`)."""
        self._tracked[handle] = None

    def untrack(self, handle: ConnectionHandle) -> None:
        """Forgets a connection; call it last, right before the handler returns."""
        self._tracked.pop(handle, None)
        self._evicted.discard(handle)

    def _make_room(self) -> bool:
        """Whether a newcomer may be admitted, evicting the oldest evictable connection if needed."""
        if self.connections - len(self._evicted) < self.max_connections:
            return True
        for handle in self._tracked:
            if handle.evictable:
                del self._tracked[handle]
                self._evicted.add(handle)
                handle.evict(f"closed to make room for a new connection: broker.max_connections "
                             f"({self.max_connections}) are open")
                return True
        return False

    def _accept(self, sock: socket.socket, address: Any) -> None:
        if not self._make_room():
            try:
                sock.sendall(encode_frame(Error(
                    id=0, code=ErrorCode.TOO_MANY_CONNECTIONS,
                    message=f"the broker has broker.max_connections ({self.max_connections}) connections open",
                )))
            except OSError:
                pass
            return
        self.connections += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                tls_sock = self._handshake(sock, address)
                if tls_sock is None:
                    return
                sock = tls_sock
            self._handle(sock, address)
        finally:
            self.connections -= 1

    def _handshake(self, sock: socket.socket, address: Any) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        sock.settimeout(self.handshake_timeout_s)
        try:
            tls = self.ssl_context.wrap_socket(sock, server_side=True)
            tls.settimeout(None)  # past the handshake, the handler's own idle check bounds the connection
            return tls
        except (OSError, ssl.SSLError) as exc:  # plaintext client, wrong CA, silent peer
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            log.warning("TLS handshake failed: %s", getattr(exc, "reason", None) or exc, extra={"peer": peer})
            sock.close()
            return None
