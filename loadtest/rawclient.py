"""A minimal load client: one blocking socket, frames from `transport.frames`, no reader thread.

The benchmark measures the broker with it, not the Python client's reader thread and locks: the caller
writes frames and reads replies itself, on its own schedule. Replies are parsed only as far as the figure
needs (`FrameScanner` counts frames and spots ERRORs without copying payloads; `decode_response` where an
id or a task is needed).

Request frames are built from a `FrameTemplate`: the message is encoded once with `id = 0xFFFFFFFF` (which
MessagePack writes as a fixed `0xce` + 4 bytes), and each request patches its own id into a copy. A frame
costs a slice and a `pack_into`, so a single client process can offer a few hundred thousand requests per
second.
"""

from __future__ import annotations

import socket
import struct
import time

import msgspec

from transport import messages as m
from transport.frames import FrameReader, decode_response, encode_frame

ERROR_TYPE = m.Error.type_byte
_ID_MARK = b"\xa2id\xce\xff\xff\xff\xff"
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
STAMP_MARK = b"\xab\xcd\xef\x01\x23\x45\x67\x89"
RECV_BYTES = 1 << 20


class FrameTemplate:
    """Frames of one message that differ only in their request id (and, optionally, a time stamp).

    With `stamped`, the message's payload must start with `STAMP_MARK`; `frame(id, stamp)` writes the
    stamp there as a big-endian double, so a receiver can tell how long the task took to reach it.
    """

    __slots__ = ("_frame", "_at", "_stamp_at")

    def __init__(self, msg: m.Message, stamped: bool = False) -> None:
        frame = encode_frame(msgspec_replace_id(msg, 0xFFFF_FFFF))
        self._frame = frame
        self._at = _find_once(frame, _ID_MARK, type(msg).__name__) + len(_ID_MARK) - 4
        self._stamp_at = _find_once(frame, STAMP_MARK, type(msg).__name__) if stamped else -1

    def frame(self, request_id: int, stamp: float | None = None) -> bytes:
        buf = bytearray(self._frame)
        _U32.pack_into(buf, self._at, request_id)
        if stamp is not None:
            _F64.pack_into(buf, self._stamp_at, stamp)
        return bytes(buf)

    def frames(self, first_id: int, count: int) -> bytes:
        """`count` frames with ids first_id, first_id+1, ... in one buffer (one sendall)."""
        one = self._frame
        buf = bytearray(one * count)
        size, at = len(one), self._at
        for i in range(count):
            _U32.pack_into(buf, i * size + at, (first_id + i) & 0xFFFF_FFFF)
        return bytes(buf)


def _find_once(frame: bytes, mark: bytes, what: str) -> int:
    at = frame.find(mark)
    if at < 0 or frame.find(mark, at + 1) >= 0:
        raise ValueError(f"cannot find exactly one {mark!r} to patch in {what}")
    return at


def read_stamp(payload: bytes) -> float:
    """The send time a stamped task's payload carries."""
    return _F64.unpack_from(payload, 0)[0]


def msgspec_replace_id(msg: m.Message, request_id: int) -> m.Message:
    return msgspec.structs.replace(msg, id=request_id)


def submit_template(payload_bytes: int = 100, priority: int | str = "normal", queue: str = "default",
                    kind: str = "bench.noop", stamped: bool = False) -> FrameTemplate:
    payload = (STAMP_MARK if stamped else b"") + b"x" * (payload_bytes - (len(STAMP_MARK) if stamped else 0))
    spec = m.TaskSpec(kind=kind, payload=payload, queue=queue, priority=priority)
    return FrameTemplate(m.Submit(id=0, task=spec), stamped=stamped)


def batch_template(size: int, payload_bytes: int = 100, queue: str = "default") -> FrameTemplate:
    spec = m.TaskSpec(kind="bench.noop", payload=b"x" * payload_bytes, queue=queue)
    return FrameTemplate(m.SubmitBatch(id=0, tasks=[spec] * size))


class FrameScanner:
    """Counts complete frames in a byte stream (and the ERRORs among them) without decoding payloads."""

    __slots__ = ("_buf", "errors", "first_error")

    def __init__(self) -> None:
        self._buf = b""
        self.errors = 0
        self.first_error: bytes | None = None

    def feed(self, data: bytes) -> int:
        buf = self._buf + data if self._buf else data
        pos, end, count = 0, len(buf), 0
        unpack = _U32.unpack_from
        while end - pos >= 5:
            (length,) = unpack(buf, pos)
            nxt = pos + 4 + length
            if nxt > end:
                break
            if buf[pos + 4] == ERROR_TYPE:
                self.errors += 1
                if self.first_error is None:
                    self.first_error = bytes(buf[pos + 5 : nxt])
            count += 1
            pos = nxt
        self._buf = buf[pos:] if pos < end else b""
        return count

    def error_text(self) -> str:
        if self.first_error is None:
            return ""
        err = decode_response(ERROR_TYPE, self.first_error)
        return f"{err.code}: {err.message}"  # type: ignore[attr-defined]


class RawClient:
    """One blocking TCP connection (TCP_NODELAY) to a frame server."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)  # truly blocking: a timeout would add a poll() before every recv()
        self.scanner = FrameScanner()
        self.reader = FrameReader(256 * 1024 * 1024)
        self._buf = bytearray(RECV_BYTES)
        self._view = memoryview(self._buf)

    def recv(self) -> bytes:
        """Blocks for the next read. `recv_into` a reused buffer: a plain `recv(1 MiB)` costs ~25-45 us more
        per call here (glibc serves allocations that large with mmap/munmap every time)."""
        n = self.sock.recv_into(self._buf)
        if not n:
            raise ConnectionError("server closed the connection")
        return self._view[:n].tobytes()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_count(self) -> int:
        """Blocks for the next read; the number of complete reply frames it finished (maybe 0)."""
        return self.scanner.feed(self.recv())

    def wait_count(self, n: int) -> None:
        """Reads until `n` more reply frames have arrived."""
        while n > 0:
            n -= self.recv_count()

    def recv_messages(self) -> list[m.Message]:
        """Blocks for the next read; the decoded reply frames it finished."""
        return [decode_response(t, p) for t, p in self.reader.feed(self.recv())]

    def call(self, msg: m.Message) -> m.Message:
        """Sends one request and returns its decoded reply (an ERROR raises RuntimeError)."""
        self.send(encode_frame(msg))
        while True:
            for reply in self.recv_messages():
                if isinstance(reply, m.Error):
                    raise RuntimeError(f"{reply.code}: {reply.message}")
                return reply


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of already sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


def now() -> float:
    """The clock every load process shares: CLOCK_MONOTONIC is system-wide on Linux."""
    return time.monotonic()
