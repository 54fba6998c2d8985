"""TLS for the Python client over memory BIOs (`ssl.SSLObject`) instead of `ssl.SSLSocket`.

Why: the client's reader thread and its writers would otherwise call SSL_read and SSL_write on one SSL
object at the same time, which OpenSSL does not support (it showed up as a HELLO that never got its
WELCOME). Like `transport.connection`, this never imports gevent and looks `threading` up at call time,
so monkey patching turns its locks into gevent locks.
"""

from __future__ import annotations

import socket
import ssl
import threading

from transport.connection import RECV_BYTES


class TlsSocket:
    """TLS over a plain socket through `ssl.SSLObject` and memory BIOs.

    The socket I/O stays plain (full duplex: the reader's recv and the writers' sendall may overlap) and
    only the in-memory encrypt/decrypt steps touch the SSL object, under a lock, never blocking. Writers
    are already serialised by the connection's write lock; `_send_lock` additionally orders the reader's
    rare own records (a TLS 1.3 KeyUpdate answer) with theirs.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        while True:  # the handshake, before the reader exists: no locking needed yet
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._sock.sendall(self._out.read())
                data = self._sock.recv(RECV_BYTES)
                if not data:
                    raise ConnectionResetError("connection closed during the TLS handshake") from None
                self._in.write(data)
        self._sock.sendall(self._out.read())

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._tls_lock:
                self._tls.write(data)  # a memory BIO never says "would block": all of it is encrypted
                out = self._out.read()
            self._sock.sendall(out)

    def recv(self, size: int) -> bytes:
        while True:
            with self._tls_lock:
                try:
                    return self._tls.read(size)
                except ssl.SSLZeroReturnError:  # close_notify
                    return b""
                except ssl.SSLWantReadError:
                    pass
                reply = self._out.pending
            if reply and self._send_lock.acquire(False):  # else a writer is mid-send; flush next time
                try:
                    with self._tls_lock:
                        out = self._out.read()
                    self._sock.sendall(out)
                finally:
                    self._send_lock.release()
            data = self._sock.recv(size)
            if not data:
                return b""
            with self._tls_lock:
                self._in.write(data)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()
