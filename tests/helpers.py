"""Small helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import msgspec

from transport.frames import FrameReader


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine outside loopback (to connect from as a "remote" peer), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # no packet is sent; this only picks the outgoing address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Polls `predicate` until it returns something truthy (returned), or fails the test at the deadline.

    For outcomes that arrive on the broker's timers (leases, heartbeats, history batches): the deadline
    is generous, and the poll returns as soon as the outcome is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(interval)


class RawConn:
    """A hand-driven protocol connection, for replies a Client would hide (id-0 errors, the broker
    hanging up): send bytes, read whole frames back as decoded maps."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(1 << 28)
        self.frames: deque[tuple[int, bytes]] = deque()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame as (type byte, payload bytes); fails the test if none comes in `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no frame from the broker within the timeout"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "the broker closed the connection instead of answering"
            self.frames.extend(self.reader.feed(data))
        return self.frames.popleft()

    def recv_frame(self, timeout: float = 5.0) -> tuple[int, Any]:
        type_byte, payload = self.recv_raw(timeout)
        return type_byte, msgspec.msgpack.decode(payload)

    def wait_closed(self, timeout: float) -> float | None:
        """Seconds until the broker closes the connection, or None if it is still open after `timeout`.

        Frames that arrive meanwhile are kept for `recv_frame`.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionResetError:
                return time.monotonic() - started
            if not data:
                return time.monotonic() - started
            self.frames.extend(self.reader.feed(data))

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def hub_gaps(tick_s: float = 0.005) -> Iterator[list[float]]:
    """Records how long a greenlet asking to sleep `tick_s` actually waited, while the block runs:
    the largest gap shows how long the work in the block kept the gevent hub from other greenlets."""
    gaps: list[float] = []

    def ticker() -> None:
        while True:
            before = time.perf_counter()
            gevent.sleep(tick_s)
            gaps.append(time.perf_counter() - before)

    running = gevent.spawn(ticker)
    try:
        yield gaps
    finally:
        running.kill()
