"""The pipe between the broker and its database process: framing, operation names, error kinds.

A frame is an 8-byte big-endian length and a msgpack body (8 bytes: a snapshot of a million large
tasks can pass 4 GiB). Requests are `[id, op, args]`; replies `[id, ok, value]`, where a failed reply's
value is `[kind, message]`. Id 0 is the process's start-up report, `LOG_ID` a log record
`[levelno, logger, message]` the broker re-emits in its own log format.

Both sides do their pipe I/O cooperatively (gevent non-blocking file descriptors), so a 100 MB
snapshot on its way through never stops other greenlets.
"""

from __future__ import annotations

import struct
from typing import Any

import gevent.lock
import gevent.os
import msgspec

from storage.errors import QueryRefused, QueryTimeout, StorageError

LENGTH = struct.Struct(">Q")
READY_ID = 0
LOG_ID = -1
MAX_CHUNK = 1 << 20  # bytes per write() call: bounds how long one cooperative write holds the hub

ERROR_KINDS: dict[str, type[StorageError]] = {
    "storage": StorageError,
    "timeout": QueryTimeout,
    "refused": QueryRefused,
}
_KIND_OF = {cls: kind for kind, cls in ERROR_KINDS.items()}

_encoder = msgspec.msgpack.Encoder()


def encode(body: Any) -> bytes:
    """One frame: length, then msgpack."""
    payload = _encoder.encode(body)
    return LENGTH.pack(len(payload)) + payload


def error_value(exc: BaseException) -> list[str]:
    """[kind, message] for a failed reply; unknown exceptions become storage errors with their type."""
    kind = _KIND_OF.get(type(exc))
    if kind is not None:
        return [kind, getattr(exc, "message", str(exc))]
    return ["storage", f"{type(exc).__name__}: {exc}"]


def raise_error(value: list[str]) -> None:
    kind, message = value
    raise ERROR_KINDS.get(kind, StorageError)(message)


def write_all(fd: int, data: bytes) -> None:
    """Writes every byte, in chunks, waiting cooperatively while the pipe is full."""
    view = memoryview(data)
    while view:
        written = gevent.os.nb_write(fd, view[:MAX_CHUNK])
        view = view[written:]


class FrameWriter:
    """Writes whole frames to a non-blocking fd; frames of concurrent greenlets never interleave."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = gevent.lock.Semaphore()

    def send(self, body: Any) -> None:
        frame = encode(body)
        with self._lock:
            write_all(self.fd, frame)


class FrameReader:
    """Reads whole frames from a non-blocking fd; `None` at end of file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = gevent.os.nb_read(self.fd, max(size - len(self._buffer), 65536))
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read(self) -> Any | None:
        if not self._fill(LENGTH.size):
            return None
        (length,) = LENGTH.unpack_from(self._buffer)
        if not self._fill(LENGTH.size + length):
            return None
        body = bytes(memoryview(self._buffer)[LENGTH.size:LENGTH.size + length])
        del self._buffer[:LENGTH.size + length]
        return msgspec.msgpack.decode(body)
