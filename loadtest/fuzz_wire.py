"""Wire-level pieces of the fuzzer (`python -m loadtest.fuzz`): framing, one raw connection, the tallies.

Why raw sockets and not `transport.client`: the fuzzer must send what no correct client would (bad
lengths, unknown types, torn frames) and still decode and judge every reply. `RawConn` checks each reply
it reads (undecodable, unknown error code, INTERNAL) into the shared `Tally`, which every fuzz thread and
the canary write to under one lock.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from transport import messages as m
from transport.frames import FrameError, FrameReader, decode_response

HEADER = struct.Struct(">IB")
REQ = {cls.__name__.upper(): cls.type_byte for cls in m.REQUEST_TYPES.values()}
ERROR_CODES = {v for k, v in vars(m.ErrorCode).items() if k.isupper()}
REPLY_TIMEOUT_S = 5.0


def frame(type_byte: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, type_byte) + payload


def pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


@dataclass
class Options:
    """The command line of `python -m loadtest.fuzz` (see its `parse_args`)."""

    host: str
    port: int
    seconds: float
    pid: int | None
    seed: int
    workers: int
    stall_conns: int
    max_frame_bytes: int
    api_key: str | None
    tls: bool
    ca_file: str | None
    json_path: str | None
    quiet: bool
    attack: str | None = None  # a connection-level attack of loadtest.fuzz_hostile instead of frame fuzzing
    conns: int = 400  # attacker connections kept open (--attack)
    interval: float = 20.0  # slowloris: seconds between the bytes of one connection


# ------------------------------------------------------------------ shared tallies


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)  # frames (or raw writes) sent, by fuzz kind
    errors: Counter = field(default_factory=Counter)  # ERROR replies, by code
    replies: Counter = field(default_factory=Counter)  # every reply, by type name
    anomalies: Counter = field(default_factory=Counter)
    anomaly_examples: list[str] = field(default_factory=list)
    connections: int = 0
    closed_by_broker: int = 0
    canary_ok: int = 0
    canary_failed: int = 0
    canary_failures: list[str] = field(default_factory=list)
    canary_latency: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, counter: str, key: str, n: int = 1) -> None:
        with self.lock:
            getattr(self, counter)[key] += n

    def anomaly(self, kind: str, detail: str) -> None:
        with self.lock:
            self.anomalies[kind] += 1
            example = f"{kind}: {detail[:300]}"
            if len(self.anomaly_examples) < 20 and not any(e[:60] == example[:60] for e in self.anomaly_examples):
                self.anomaly_examples.append(example)

    def canary(self, ok: bool, detail: str = "", latency: float | None = None) -> None:
        with self.lock:
            if ok:
                self.canary_ok += 1
            else:
                self.canary_failed += 1
                if len(self.canary_failures) < 20:
                    self.canary_failures.append(detail[:400])
            if latency is not None:
                self.canary_latency.append(latency)


# ------------------------------------------------------------------ one raw connection


class RawConn:
    """A socket plus a reply decoder; every reply goes through the tallies and the anomaly checks."""

    def __init__(self, opts: Options, tally: Tally, timeout: float = REPLY_TIMEOUT_S) -> None:
        sock = socket.create_connection((opts.host, opts.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if opts.tls:
            context = ssl.create_default_context(cafile=opts.ca_file)
            context.check_hostname = False
            sock = context.wrap_socket(sock)
        self.sock = sock
        self.tally = tally
        self.reader = FrameReader(1 << 30)
        self.replies: dict[int, list[m.Message]] = {}
        self.eof = False
        with tally.lock:
            tally.connections += 1
        if opts.api_key is not None:
            self.send(frame(REQ["HELLO"], pack({"id": 1, "client": "fuzz", "protocol": 1, "api_key": opts.api_key})))
            self.wait_for([1])

    def send(self, data: bytes | memoryview) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:  # the broker closed on us (a framing error it answered, or a limit): fine
            return False

    def pump(self, timeout: float) -> bool:
        """Reads once (up to `timeout`); False at EOF or on a socket error."""
        if self.eof:
            return False
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        except OSError:
            data = b""
        if not data:
            self.eof = True
            with self.tally.lock:
                self.tally.closed_by_broker += 1
            return False
        try:
            frames = self.reader.feed(data)
        except FrameError as exc:
            self.tally.anomaly("bad reply frame", exc.message)
            self.eof = True
            return False
        for type_byte, payload in frames:
            try:
                reply = decode_response(type_byte, payload)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                self.tally.anomaly("undecodable reply", f"type 0x{type_byte:02X}: {exc}")
                continue
            self.tally.add("replies", type(reply).__name__)
            if isinstance(reply, m.Error):
                self.tally.add("errors", reply.code)
                if reply.code not in ERROR_CODES:
                    self.tally.anomaly("unknown error code", f"{reply.code}: {reply.message}")
                elif reply.code == m.ErrorCode.INTERNAL:
                    self.tally.anomaly("INTERNAL error", reply.message)
            self.replies.setdefault(reply.id, []).append(reply)  # type: ignore[attr-defined]
        return True

    def wait_for(self, ids: list[int], timeout: float = REPLY_TIMEOUT_S) -> list[int]:
        """Reads until every id has a reply (or EOF / timeout); returns the ids still missing."""
        deadline = time.monotonic() + timeout
        missing = [i for i in ids if i not in self.replies]
        while missing and time.monotonic() < deadline and self.pump(deadline - time.monotonic()):
            missing = [i for i in missing if i not in self.replies]
        return missing

    def wait_eof(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pump(deadline - time.monotonic()):
            pass
        return self.eof

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pump(deadline - time.monotonic()):
            pass

    def reset(self) -> None:
        """Close with an RST instead of a FIN."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
