"""The TCP listener: a gevent StreamServer with a connection limit and a clear error for a busy port.

It knows frames, not actors: each accepted socket is handed to `handle(sock, address)` in its own
greenlet. One connection over `max_connections` is answered `ERROR{id: 0, TOO_MANY_CONNECTIONS}` and
closed; the others are unaffected.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from gevent.server import StreamServer

from transport.frames import encode_frame
from transport.messages import Error, ErrorCode

log = logging.getLogger("tqbroker.server")


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

    def _accept(self, sock: socket.socket, address: Any) -> None:
        if self.connections >= self.max_connections:
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
                sock = self._handshake(sock, address)
                if sock is None:
                    return
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
