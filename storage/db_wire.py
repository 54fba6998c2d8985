"""The pipe between the broker and its database process: framing, operation names, error kinds.

A frame is two 8-byte big-endian lengths (body, attachment), a msgpack body and the attachment: raw
bytes that travel beside the body instead of inside it, so a snapshot's task blob (hundreds of MB for
a million tasks) is never copied into a msgpack buffer on either side (8-byte lengths: such a blob
can pass 4 GiB). Requests are `[id, op, args]`; replies `[id, ok, value]`, where a failed reply's
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

from storage.errors import QueryRefused, QueryTimeout, StorageCorrupt, StorageError

HEAD = struct.Struct(">QQ")
READY_ID = 0
LOG_ID = -1
MAX_CHUNK = 1 << 20  # bytes per write() call: bounds how long one cooperative write holds the hub

ERROR_KINDS: dict[str, type[StorageError]] = {
    "storage": StorageError,
    "timeout": QueryTimeout,
    "refused": QueryRefused,
    "corrupt": StorageCorrupt,
}
_KIND_OF: dict[type[BaseException], str] = {cls: kind for kind, cls in ERROR_KINDS.items()}

_encoder = msgspec.msgpack.Encoder()


class Attached(msgspec.Struct, gc=False):
    """A reply value with raw bytes that travel beside it as the frame's attachment."""

    value: Any
    attachment: bytes | bytearray


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

    def send(self, body: Any, attachment: bytes | bytearray = b"") -> None:
        payload = _encoder.encode(body)
        with self._lock:
            self._write_all(HEAD.pack(len(payload), len(attachment)) + payload)
            if attachment:
                self._write_all(attachment)

    def _write_all(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
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

    def read(self) -> tuple[Any, bytearray] | None:
        """(body, attachment) of the next frame, or None at end of file (also mid-frame)."""
        if not self._fill(HEAD.size):
            return None
        length, attachment_length = HEAD.unpack_from(self._buffer)
        if not self._fill(HEAD.size + length):
            return None
        body = msgspec.msgpack.decode(memoryview(self._buffer)[HEAD.size:HEAD.size + length])
        del self._buffer[:HEAD.size + length]
        attachment = self._read_attachment(attachment_length)
        return None if attachment is None else (body, attachment)

    def _read_attachment(self, size: int) -> bytearray | None:
        """Reads `size` bytes into one buffer allocated once (no growing copies of a big blob)."""
        attachment = bytearray(size)
        have = min(size, len(self._buffer))
        attachment[:have] = self._buffer[:have]
        del self._buffer[:have]
        while have < size:
            chunk = self._read(self.fd, min(size - have, 1 << 20))
            if not chunk:
                return None
            attachment[have:have + len(chunk)] = chunk
            have += len(chunk)
        return attachment
