"""The TCP listener: a gevent StreamServer with a connection limit and a clear error for a busy port.

It knows frames, not actors: each accepted socket is handed to `handle(sock, address)` in its own
greenlet. One connection over `max_connections` is answered `ERROR{id: 0, TOO_MANY_CONNECTIONS}` and
closed; the others are unaffected.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Callable
from typing import Any

from gevent.server import StreamServer

from transport.frames import encode_frame
from transport.messages import Error, ErrorCode


class ListenError(Exception):
    """The server could not listen; the message says on what and why, in one line."""


class TcpServer:
    def __init__(
        self, host: str, port: int, handle: Callable[[socket.socket, Any], None], max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._handle = handle
        self.max_connections = max_connections
        self.connections = 0
        kwargs: dict[str, Any] = {"ssl_context": ssl_context} if ssl_context is not None else {}
        self._server = StreamServer((host, port), self._accept, **kwargs)

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
            self._handle(sock, address)
        finally:
            self.connections -= 1
