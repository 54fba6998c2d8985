"""Connection-level attacks of `python -m loadtest.fuzz --attack KIND` (issue 10, items 2, 3 and 7):

  partial-frames  N connections each send the header of a max_frame_bytes frame, then as much of its
                  body as the broker will read, never the last byte (memory before authentication)
  slowloris       N connections each send one byte every --interval seconds (default 20), never a
                  whole frame or HELLO: they hold connection slots (auth on or off)
  hello-flood     connections that each send one HELLO with a wrong api_key, as fast as they can

Every closed attacker connection is replaced, so N stay open whenever the broker lets them. Meanwhile
the fuzzer's canary runs, and a probe dials a fresh connection every 2 s and times it up to its first
answered STATS (`legit connects`: how many took over 1 s or failed). One thread drives all attacker
sockets (non-blocking, with `selectors`), so 1,000 connections cost 1,000 file descriptors, not threads.
"""

from __future__ import annotations

import resource
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import msgspec

from loadtest.fuzz_wire import Options
from transport.client import Client
from transport.errors import BrokerError, ClientError

ATTACKS = ("partial-frames", "slowloris", "hello-flood")
HEADER = struct.Struct(">IB")
PROBE_EVERY_S = 2.0
LEGIT_CONNECT_S = 1.0
CHUNK = bytes(64 * 1024)


@dataclass
class AttackTally:
    opened: int = 0
    closed_by_broker: int = 0
    refused: int = 0  # connect() failed
    open_max: int = 0
    bytes_sent: int = 0
    hellos: int = 0
    probes: list[float] = field(default_factory=list)  # seconds to an answered STATS; inf = failed
    probe_errors: list[str] = field(default_factory=list)


def raise_fd_limit(n: int) -> None:
    """Lets this process hold `n` sockets (plus margin) if the hard limit allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


class Attack:
    """N attacker connections of one kind, kept open until `stop` is set."""

    def __init__(self, opts: Options, kind: str, conns: int, interval: float, stop: threading.Event) -> None:
        self.opts, self.kind, self.conns, self.interval, self.stop = opts, kind, conns, interval, stop
        self.tally = AttackTally()
        self.sel = selectors.DefaultSelector()
        self.sent: dict[socket.socket, int] = {}  # bytes sent so far on each connection
        self.next_byte: dict[socket.socket, float] = {}  # slowloris: when each sends its next byte
        self.length = opts.max_frame_bytes

    def run(self) -> None:
        raise_fd_limit(self.conns)
        while not self.stop.is_set():
            self._top_up()
            for key, events in self.sel.select(timeout=0.2):
                sock = key.fileobj
                if events & selectors.EVENT_READ:
                    self._on_readable(sock)  # type: ignore[arg-type]
                elif events & selectors.EVENT_WRITE:
                    self._on_writable(sock)  # type: ignore[arg-type]
            if self.kind == "slowloris":
                self._dribble()
        for sock in list(self.sent):
            self._drop(sock)

    def _top_up(self) -> None:
        """Opens connections until `conns` are open (a few per round, so the loop stays responsive)."""
        for _ in range(min(self.conns - len(self.sent), 50)):
            try:
                sock = socket.create_connection((self.opts.host, self.opts.port), timeout=2.0)
            except OSError:
                self.tally.refused += 1
                return
            sock.setblocking(False)
            self.tally.opened += 1
            self.sent[sock] = 0
            self.next_byte[sock] = time.monotonic()
            first = self._first_bytes()
            self._send(sock, first)
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.kind == "partial-frames" else 0)
            self.sel.register(sock, mask)
        self.tally.open_max = max(self.tally.open_max, len(self.sent))

    def _first_bytes(self) -> bytes:
        if self.kind == "partial-frames":
            return HEADER.pack(self.length, 0x09)  # a STATS of max_frame_bytes, body to follow
        if self.kind == "hello-flood":
            self.tally.hellos += 1
            payload = msgspec.msgpack.encode({"id": 1, "client": "flood", "protocol": 1,
                                              "api_key": f"wrong-{self.tally.hellos}"})
            return HEADER.pack(len(payload) + 1, 0x01) + payload
        return b""

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            n = sock.send(data)
        except BlockingIOError:
            return
        except OSError:
            self._drop(sock, by_broker=True)
            return
        self.sent[sock] += n
        self.tally.bytes_sent += n

    def _on_writable(self, sock: socket.socket) -> None:
        left = self.length + 4 - 1 - self.sent[sock]  # never the frame's last byte
        if left <= 0:
            self.sel.modify(sock, selectors.EVENT_READ)
            return
        self._send(sock, CHUNK[: min(left, len(CHUNK))])

    def _on_readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock, by_broker=True)

    def _dribble(self) -> None:
        now = time.monotonic()
        for sock, due in list(self.next_byte.items()):
            if due <= now and sock in self.sent:
                self._send(sock, b"\x00")
                self.next_byte[sock] = now + self.interval

    def _drop(self, sock: socket.socket, by_broker: bool = False) -> None:
        if sock not in self.sent:
            return
        if by_broker:
            self.tally.closed_by_broker += 1
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        self.sent.pop(sock, None)
        self.next_byte.pop(sock, None)
        sock.close()

    def probe_loop(self) -> None:
        """A fresh legitimate connection every PROBE_EVERY_S: seconds until its first STATS is answered."""
        while not self.stop.wait(PROBE_EVERY_S):
            started = time.monotonic()
            try:
                with Client(self.opts.host, self.opts.port, api_key=self.opts.api_key, timeout=10.0,
                            client_name="fuzz-probe", tls=self.opts.tls, ca_file=self.opts.ca_file) as c:
                    c.stats()
                self.tally.probes.append(time.monotonic() - started)
            except (BrokerError, ClientError, OSError) as exc:
                self.tally.probes.append(float("inf"))
                self.tally.probe_errors.append(f"{type(exc).__name__}: {exc}")


def attack_summary(t: AttackTally) -> dict[str, object]:
    probes = t.probes
    finite = sorted(p for p in probes if p != float("inf"))
    return {
        "attacker_connections_opened": t.opened,
        "attacker_connections_closed_by_broker": t.closed_by_broker,
        "attacker_connects_refused": t.refused,
        "attacker_connections_open_max": t.open_max,
        "attacker_bytes_sent": t.bytes_sent,
        "failed_hellos_sent": t.hellos,
        "legit_connects": len(probes),
        "legit_connects_over_1s_or_failed": sum(1 for p in probes if p > LEGIT_CONNECT_S),
        "legit_connect_max_s": round(finite[-1], 3) if finite else None,
        "legit_connect_p50_s": round(finite[len(finite) // 2], 3) if finite else None,
        "legit_connect_errors": t.probe_errors[:5],
    }


def format_attack(kind: str, conns: int, s: dict[str, object]) -> list[str]:
    return [
        f"attack {kind} with {conns} connections: {s['attacker_connections_opened']} opened, "
        f"{s['attacker_connections_closed_by_broker']} closed by the broker, {s['attacker_connects_refused']} "
        f"connects refused, at most {s['attacker_connections_open_max']} open at once, "
        f"{s['attacker_bytes_sent']} bytes sent" + (f", {s['failed_hellos_sent']} failed HELLOs"
                                                     if s["failed_hellos_sent"] else ""),
        f"legit connects: {s['legit_connects']} tried, {s['legit_connects_over_1s_or_failed']} over "
        f"{LEGIT_CONNECT_S:g} s or failed (p50 {s['legit_connect_p50_s']} s, max {s['legit_connect_max_s']} s)",
        *[f"    {e}" for e in s["legit_connect_errors"]],  # type: ignore[attr-defined]
    ]
