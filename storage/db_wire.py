"""The pipe between the broker and its database process: framing, operation names, error kinds.

A frame is an 8-byte big-endian length and a msgpack body (8 bytes: a snapshot of a million large
tasks can pass 4 GiB). Requests are `[id, op, args]`; replies `[id, ok, value]`, where a failed reply's
value is `[kind, message]`. Id 0 is the process's start-up report, `LOG_ID` a log record
`[levelno, logger, message]` the broker re-emits in its own log format.

The broker reads and writes the pipe cooperatively (gevent's non-blocking `nb_read`/`nb_write`, so
a 100 MB snapshot on its way through never stops other greenlets); the database process, which has no
gevent, uses plain blocking `os.read`/`os.write` from its threads. Both pass their functions in.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

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


class FrameWriter:
    """Writes whole frames to `fd` with `write` (os.write or gevent's nb_write); frames of concurrent
    callers never interleave (`lock`: a threading.Lock, or a gevent Semaphore in the broker)."""

    def __init__(self, fd: int, write: Callable[[int, Any], int] = os.write,
                 lock: AbstractContextManager[Any] | None = None) -> None:
        self.fd = fd
        self._write = write
        self._lock = lock if lock is not None else threading.Lock()

    def send(self, body: Any) -> None:
        frame = encode(body)
        with self._lock:
            view = memoryview(frame)
            while view:
                view = view[self._write(self.fd, view[:MAX_CHUNK]):]


class FrameReader:
    """Reads whole frames from `fd` with `read` (os.read or gevent's nb_read); `None` at end of file."""

    def __init__(self, fd: int, read: Callable[[int, int], bytes] = os.read) -> None:
        self.fd = fd
        self._read = read
        self._buffer = bytearray()

    def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = self._read(self.fd, max(size - len(self._buffer), 65536))
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
