"""A raw-socket protocol fuzzer with a canary client: does the broker stay correct under garbage?

    python -m loadtest.fuzz --host 127.0.0.1 --port 6379 --seconds 60 [--pid PID] [--seed N] [--json FILE]

Fuzz threads open their own connections and send, by kind:

  random_bytes   random bytes, no framing at all
  random_type    a MessagePack map with an `id` under a random type byte (unknown types must be answered
                 UNKNOWN_TYPE echoing the id, and the connection must stay usable)
  mutated        a valid request of a random type with fields deleted, retyped, out of range, oversized,
                 deeply nested or unknown; each is followed by a STATS probe that must be answered
  pipelined      2-60 valid or mutated requests in one write; every id must be answered
  bitflip        a valid frame with random bits flipped, header included
  truncated      a valid frame cut short, then the connection closed
  zero_length    length 0: BAD_FRAME and close
  oversize       a length over max_frame_bytes: FRAME_TOO_LARGE and close, without the body being read
  stalled_big    a frame announcing exactly max_frame_bytes (16 MiB), most of it sent, then a stall; then
                 either abandoned or completed (a STATS with a 16 MiB pad that must be answered)
  abandoned      connect and vanish: at once, mid-header, after unanswered requests, with an RST, or
                 with a long-poll CLAIM waiting
  sql            QUERY statements that write, read files or run two statements: all must be refused

Every reply is decoded; an undecodable reply, an unknown error code, an INTERNAL error, an expected
reply that never came or a refused-SQL statement that ran is an *anomaly* (reported, not fatal).

The canary is a well-behaved client on its own connection and queue: submit / claim / complete / status
round trips with random payloads, priority order in batches, fail and cancel paths, STATS, and whether a
task submitted after an abandoned long-poll CLAIM still reaches a live worker. Each round is a check.

At the end it prints a summary: frames sent by kind, errors received by code, canary checks ok/failed,
broker RSS start/end/max (psutil, with --pid) and whether the broker survived. Exit status 1 if any
canary check failed or the broker died (or is unreachable at the end), else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from transport import messages as m
from transport.client import Client
from transport.errors import BrokerError, ClientError
from transport.frames import FrameError, FrameReader, decode_response

HEADER = struct.Struct(">IB")
REQ = {cls.__name__.upper(): cls.type_byte for cls in m.REQUEST_TYPES.values()}
ERROR_CODES = {v for k, v in vars(m.ErrorCode).items() if k.isupper()}
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
REPLY_TIMEOUT_S = 5.0
SLOW_CANARY_S = 5.0
KIND_WEIGHTS = {
    "random_bytes": 8, "random_type": 10, "mutated": 30, "pipelined": 8, "bitflip": 8, "truncated": 6,
    "zero_length": 3, "oversize": 3, "stalled_big": 2, "abandoned": 6, "sql": 2,
}
REFUSED_SQL = [
    "DELETE FROM task_history", "DROP TABLE task_history", "UPDATE task_history SET state = 'x'",
    "INSERT INTO task_history (task_id) VALUES ('x')", "CREATE TABLE fuzz (a INT)",
    "SELECT 1; SELECT 2", "COPY task_history TO '/tmp/tqbroker-fuzz.csv'", "ATTACH ':memory:' AS fuzz",
    "SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')", "PRAGMA version",
    "INSTALL httpfs", "CHECKPOINT", "SET threads = 64", "CALL pragma_database_size()",
]


def frame(type_byte: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, type_byte) + payload


def pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


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


# ------------------------------------------------------------------ generating requests


class Gen:
    """Valid requests, and mutations of them, from one seeded `random.Random`."""

    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag
        self.next_id = rng.randrange(2, 1 << 30)
        self.seen_task_ids: list[str] = []
        self.too_deep = False  # the last mutation nested deeper than the broker's decoder goes

    def rid(self) -> int:
        self.next_id = self.next_id % 0xFFFF_FFF0 + 1
        return self.next_id

    def text(self, lo: int = 1, hi: int = 12) -> str:
        alphabet = "abcxyz019_-.:/ é\u2603\U0001f600\n\0"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(lo, hi)))

    def queue(self) -> str:
        return f"fuzz-{self.tag}-{self.rng.randrange(4)}"

    def worker(self) -> str:
        return f"fuzz-{self.tag}-w{self.rng.randrange(3)}"

    def task_id(self) -> str:
        if self.seen_task_ids and self.rng.random() < 0.6:
            return self.rng.choice(self.seen_task_ids)
        return self.text(1, 30)

    def spec(self) -> dict[str, Any]:
        r = self.rng
        spec: dict[str, Any] = {"kind": f"fuzz.{r.randrange(5)}"}
        if r.random() < 0.7:
            spec["payload"] = r.randbytes(r.randrange(64))
        if r.random() < 0.8:
            spec["queue"] = self.queue()
        if r.random() < 0.5:
            spec["priority"] = r.choice([r.randrange(256), "high", "normal", "low"])
        if r.random() < 0.2:
            spec["run_at"] = time.time() + r.uniform(-10, 5)
        if r.random() < 0.2:
            spec["max_retries"] = r.randrange(4)
        if r.random() < 0.2:
            spec["lease_ms"] = r.randrange(100, 60_000)
        if r.random() < 0.2:
            spec["unique_key"] = f"u{r.randrange(10)}"
        return spec

    def valid(self) -> tuple[int, dict[str, Any]]:
        r, rid = self.rng, self.rid()
        name = r.choice(list(REQ))
        body: dict[str, Any] = {"id": rid}
        if name == "HELLO":
            body.update(client=self.text(), protocol=1)
        elif name == "SUBMIT":
            body.update(task=self.spec())
        elif name == "SUBMITBATCH":
            body.update(tasks=[self.spec() for _ in range(r.randint(1, 5))])
        elif name == "CLAIM":
            body.update(worker_id=self.worker(), queues=[self.queue() for _ in range(r.randint(1, 3))],
                        max_tasks=r.randint(-1, 5), wait_ms=0)
        elif name == "RESULT":
            body.update(worker_id=self.worker(), task_id=self.task_id(), ok=r.random() < 0.5,
                        result=r.randbytes(r.randrange(32)), error=self.text(), retry=r.random() < 0.5)
        elif name == "HEARTBEAT":
            body.update(worker_id=self.worker(), active=[self.task_id() for _ in range(r.randrange(3))],
                        cpu_percent=r.uniform(0, 100), memory_bytes=r.randrange(1 << 32))
        elif name in ("STATUS", "CANCEL"):
            body.update(task_id=self.task_id())
        elif name == "REGISTER":
            body.update(worker_id=self.worker(), name=self.text(), hostname="fuzzhost", pid=r.randrange(1 << 16),
                        queues=[self.queue()], concurrency=r.randrange(8), metadata={self.text(): self.text()})
        elif name == "DEREGISTER":
            body.update(worker_id=self.worker())
        elif name == "QUERY":
            body.update(sql=r.choice(["SELECT count(*) FROM task_history", "SELECT 1",
                                      "SELECT state, count(*) FROM task_history GROUP BY state"]))
        return REQ[name], body

    def valid_frame(self) -> bytes:
        type_byte, body = self.valid()
        return frame(type_byte, pack(body))

    def junk(self, depth: int = 0) -> Any:
        """A random MessagePack value of a random type, sometimes big or deeply nested."""
        r = self.rng
        roll = r.random()
        if roll < 0.08 and depth == 0:  # built as raw bytes: the encoder itself refuses this depth
            levels = r.choice([50, 500, 5000, 100_000])
            self.too_deep |= levels >= 500  # answered with id 0: the broker cannot read the id past it
            return msgspec.Raw(r.choice([b"\x91", b"\x81\xa1k"]) * levels + b"\xc0")
        if roll < 0.12 and depth == 0:
            return r.choice(["x" * r.choice([201, 1001, 4097, 65_537, 200_000]), b"\0" * 300_000,
                             list(range(r.choice([1001, 10_001, 100_001])))])
        choices = [
            None, True, False, 0, -1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, r.randrange(-1000, 1000),
            float("nan"), float("inf"), float("-inf"), -0.0, 1e308, r.random(), "", self.text(),
            "high", "default", r.randbytes(r.randrange(20)), b"",
        ]
        if depth < 3:
            choices += [[self.junk(depth + 1) for _ in range(r.randrange(4))],
                        {self.text(): self.junk(depth + 1) for _ in range(r.randrange(4))}]
        return r.choice(choices)

    def mutate(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.rng
        self.too_deep = False
        for _ in range(r.randint(1, 3)):
            target = body
            if "task" in body and r.random() < 0.5:
                target = body["task"]
            elif body.get("tasks") and r.random() < 0.5:
                target = r.choice(body["tasks"]) if isinstance(body["tasks"], list) and body["tasks"] else body
            if not isinstance(target, dict) or not target:
                continue
            key = r.choice(list(target))
            op = r.random()
            if op < 0.25:
                del target[key]
            elif op < 0.85:
                target[key] = self.junk()
            else:
                target[self.text()] = self.junk()
        return body


# ------------------------------------------------------------------ the fuzz kinds


@dataclass
class Options:
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


class Fuzzer:
    def __init__(self, opts: Options, tally: Tally, stop: threading.Event) -> None:
        self.opts = opts
        self.tally = tally
        self.stop = stop
        self.stall_slots = threading.BoundedSemaphore(max(opts.stall_conns, 0) or 1)
        self.stall_enabled = opts.stall_conns > 0
        self.big_pad = self._big_stats_frame()

    def _big_stats_frame(self) -> bytes:
        """A STATS frame of exactly max_frame_bytes (`length`), padded with an unknown bin field."""
        base = len(pack({"id": 0xFFFF_FFF0, "pad": b""}))  # bin8 header 2 bytes; bin32 header is 5
        pad = self.opts.max_frame_bytes - 1 - base - 3
        payload = pack({"id": 0xFFFF_FFF0, "pad": bytes(max(pad, 0))})
        assert len(payload) + 1 == self.opts.max_frame_bytes or pad <= 0
        return frame(REQ["STATS"], payload)

    def run_worker(self, index: int) -> None:
        rng = random.Random(self.opts.seed * 1000 + index)
        gen = Gen(rng, f"{index}")
        kinds, weights = zip(*KIND_WEIGHTS.items(), strict=True)
        while not self.stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            try:
                getattr(self, f"do_{kind}")(gen)
            except (OSError, ssl.SSLError):
                pass  # the broker closed a connection we were still writing to: not a finding by itself
            except Exception as exc:  # a bug in the fuzzer: report it, keep going
                self.tally.anomaly("fuzzer error", f"{kind}: {type(exc).__name__}: {exc}")

    def conn(self) -> RawConn:
        return RawConn(self.opts, self.tally)

    def probe(self, c: RawConn, gen: Gen, kind: str) -> None:
        """A STATS after the fuzz frame: the connection must still be alive and answering."""
        rid = gen.rid()
        if c.send(frame(REQ["STATS"], pack({"id": rid}))) and c.wait_for([rid]):
            if not c.eof:
                self.tally.anomaly("no reply", f"STATS probe after {kind} not answered in {REPLY_TIMEOUT_S} s")

    def _send_fuzz(self, c: RawConn, kind: str, data: bytes, frames: int = 1) -> bool:
        self.tally.add("sent", kind, frames)
        return c.send(data)

    def do_random_bytes(self, gen: Gen) -> None:
        c = self.conn()
        try:
            data = gen.rng.randbytes(gen.rng.randrange(1, 2048))
            self._send_fuzz(c, "random_bytes", data)
            c.drain(gen.rng.choice([0.0, 0.05, 0.2]))
        finally:
            c.close()

    def do_random_type(self, gen: Gen) -> None:
        c = self.conn()
        try:
            for _ in range(gen.rng.randint(1, 5)):
                type_byte = gen.rng.randrange(256)
                rid = gen.rid()
                gen.too_deep = False
                body = {"id": rid, **{gen.text(): gen.junk() for _ in range(gen.rng.randrange(3))}}
                if type_byte == REQ["CLAIM"]:
                    body["wait_ms"] = 0
                if not self._send_fuzz(c, "random_type", frame(type_byte, pack(body))):
                    return
                if gen.too_deep:
                    continue
                if c.wait_for([rid]):
                    if not c.eof:
                        self.tally.anomaly("no reply", f"type 0x{type_byte:02X} not answered")
                    return
                reply = c.replies[rid][0]
                if type_byte not in m.REQUEST_TYPES:
                    if not (isinstance(reply, m.Error) and reply.code == m.ErrorCode.UNKNOWN_TYPE):
                        self.tally.anomaly("wrong reply", f"unknown type 0x{type_byte:02X} answered {reply}")
            self.probe(c, gen, "random_type")
        finally:
            c.close()

    def do_mutated(self, gen: Gen) -> None:
        c = self.conn()
        try:
            for _ in range(gen.rng.randint(1, 4)):
                type_byte, body = gen.valid()
                body = gen.mutate(body)
                rid = body.get("id")
                if not self._send_fuzz(c, "mutated", frame(type_byte, pack(body))):
                    return
                waits = type_byte == REQ["CLAIM"] and body.get("wait_ms") not in (0, None)
                if type(rid) is int and 0 < rid <= 0xFFFF_FFFF and not waits and not gen.too_deep:
                    if c.wait_for([rid]) and not c.eof:
                        self.tally.anomaly("no reply", f"mutated type 0x{type_byte:02X} id {rid} not answered")
                    for reply in c.replies.get(rid, []):
                        if isinstance(reply, m.Submitted):
                            gen.seen_task_ids.append(reply.task_id)
            self.probe(c, gen, "mutated")
        finally:
            c.close()

    def do_pipelined(self, gen: Gen) -> None:
        c = self.conn()
        try:
            ids, chunks = [], []
            for _ in range(gen.rng.randint(2, 60)):
                type_byte, body = gen.valid()
                gen.too_deep = False
                if gen.rng.random() < 0.4:
                    body = gen.mutate(body)
                rid = body.get("id")
                if type(rid) is int and 0 < rid <= 0xFFFF_FFFF and type_byte != REQ["CLAIM"] and not gen.too_deep:
                    ids.append(rid)
                chunks.append(frame(type_byte, pack(body)))
            if not self._send_fuzz(c, "pipelined", b"".join(chunks), len(chunks)):
                return
            missing = c.wait_for(ids)
            if missing and not c.eof:
                self.tally.anomaly("no reply", f"{len(missing)} of {len(ids)} pipelined requests not answered")
        finally:
            c.close()

    def do_bitflip(self, gen: Gen) -> None:
        c = self.conn()
        try:
            type_byte, body = gen.valid()
            data = bytearray(frame(type_byte, pack(body)))
            for _ in range(gen.rng.randint(1, 4)):
                data[gen.rng.randrange(len(data))] ^= 1 << gen.rng.randrange(8)
            self._send_fuzz(c, "bitflip", bytes(data))
            c.drain(0.1)
        finally:
            c.close()

    def do_truncated(self, gen: Gen) -> None:
        c = self.conn()
        try:
            type_byte, body = gen.valid()
            data = frame(type_byte, pack(body))
            self._send_fuzz(c, "truncated", data[: gen.rng.randrange(1, len(data))])
            c.drain(gen.rng.choice([0.0, 0.02, 0.1]))
        finally:
            c.close()

    def do_zero_length(self, gen: Gen) -> None:
        c = self.conn()
        try:
            self._send_fuzz(c, "zero_length", b"\0\0\0\0" + frame(REQ["STATS"], pack({"id": gen.rid()})))
            if not c.wait_eof(REPLY_TIMEOUT_S):
                self.tally.anomaly("not closed", "connection stayed open after a zero-length frame")
            elif not any(isinstance(r, m.Error) and r.code == m.ErrorCode.BAD_FRAME for r in c.replies.get(0, [])):
                self.tally.anomaly("wrong reply", f"zero-length frame answered {c.replies}")
        finally:
            c.close()

    def do_oversize(self, gen: Gen) -> None:
        c = self.conn()
        try:
            length = gen.rng.choice([self.opts.max_frame_bytes + 1, 0xFFFF_FFFF,
                                     gen.rng.randrange(self.opts.max_frame_bytes + 1, 0xFFFF_FFFF)])
            self._send_fuzz(c, "oversize", struct.pack(">IB", length, REQ["SUBMIT"]) + b"\x80" * 64)
            if not c.wait_eof(REPLY_TIMEOUT_S):
                self.tally.anomaly("not closed", f"connection stayed open after a {length}-byte length")
            elif not any(isinstance(r, m.Error) and r.code == m.ErrorCode.FRAME_TOO_LARGE
                         for r in c.replies.get(0, [])):
                self.tally.anomaly("wrong reply", f"oversize frame answered {c.replies}")
        finally:
            c.close()

    def do_stalled_big(self, gen: Gen) -> None:
        if not self.stall_enabled or not self.stall_slots.acquire(blocking=False):
            return self.do_mutated(gen)
        c = None
        try:
            c = self.conn()
            big = memoryview(self.big_pad)
            cut = gen.rng.randrange(5, len(big) - 1)
            if not self._send_fuzz(c, "stalled_big", big[:cut]):
                return
            stall_until = time.monotonic() + gen.rng.uniform(0.5, 3.0)
            while time.monotonic() < stall_until and not self.stop.is_set():
                c.pump(0.1)
            if gen.rng.random() < 0.5 and not self.stop.is_set():
                if c.send(big[cut:]) and c.wait_for([0xFFFF_FFF0], timeout=15.0) and not c.eof:
                    self.tally.anomaly("no reply", "a completed 16 MiB STATS was not answered")
        finally:
            if c is not None:
                c.close()
            self.stall_slots.release()

    def do_abandoned(self, gen: Gen) -> None:
        c = self.conn()
        how = gen.rng.randrange(5)
        self.tally.add("sent", "abandoned")
        if how == 1:
            c.send(b"\0\0")
        elif how == 2:
            c.send(b"".join(gen.valid_frame() for _ in range(gen.rng.randint(1, 20))))
        elif how == 3:
            c.send(b"".join(gen.valid_frame() for _ in range(gen.rng.randint(1, 20))))
            c.reset()
            return
        elif how == 4:
            claim = {"id": gen.rid(), "worker_id": gen.worker(), "queues": [gen.queue()], "max_tasks": 5,
                     "wait_ms": gen.rng.randrange(100, 30_000)}
            c.send(frame(REQ["CLAIM"], pack(claim)))
            time.sleep(gen.rng.choice([0, 0.01, 0.05]))
        c.close()

    def do_sql(self, gen: Gen) -> None:
        c = self.conn()
        try:
            sql = gen.rng.choice(REFUSED_SQL)
            rid = gen.rid()
            self._send_fuzz(c, "sql", frame(REQ["QUERY"], pack({"id": rid, "sql": sql})))
            if c.wait_for([rid], timeout=10.0):
                self.tally.anomaly("no reply", f"QUERY {sql!r} not answered")
                return
            reply = c.replies[rid][0]
            if not isinstance(reply, m.Error):
                self.tally.anomaly("SQL not refused", f"{sql!r} ran: {reply}")
        finally:
            c.close()


# ------------------------------------------------------------------ the canary


class Canary:
    """A correct client on its own queue; every round is one check, ok or failed with the reason."""

    def __init__(self, opts: Options, tally: Tally, stop: threading.Event) -> None:
        self.opts = opts
        self.tally = tally
        self.stop = stop
        self.rng = random.Random(opts.seed)
        run = uuid.uuid4().hex[:8]
        self.queue = f"canary-{run}"
        self.worker = f"canary-{run}-w"
        self.run = run
        self.client: Client | None = None
        self.last_submitted = 0

    def _client(self) -> Client:
        if self.client is None or not self.client.connected:
            if self.client is not None:
                self.tally.canary(False, "canary connection was lost (reconnecting)")
            self.client = Client(self.opts.host, self.opts.port, api_key=self.opts.api_key, timeout=10.0,
                                 client_name="fuzz-canary", tls=self.opts.tls, ca_file=self.opts.ca_file)
        return self.client

    def run_loop(self) -> None:
        rounds = [self.round_trip] * 6 + [self.priority_batch, self.fail_and_cancel, self.stats,
                                          self.abandoned_claim]
        n = 0
        while not self.stop.is_set():
            check = rounds[n % len(rounds)]
            n += 1
            started = time.monotonic()
            try:
                problem = check(self._client())
            except (BrokerError, ClientError) as exc:
                problem = f"{check.__name__}: {type(exc).__name__}: {exc}"
            except Exception as exc:
                problem = f"{check.__name__}: unexpected {type(exc).__name__}: {exc}"
            elapsed = time.monotonic() - started
            if problem is None and elapsed > SLOW_CANARY_S and check != self.abandoned_claim:
                problem = f"{check.__name__}: took {elapsed:.1f} s"
            sleeps = check == self.abandoned_claim  # its own deliberate pauses are not latency
            self.tally.canary(problem is None, problem or "", None if sleeps else elapsed)
            self.stop.wait(0.05)

    def round_trip(self, c: Client) -> str | None:
        payload = self.rng.randbytes(self.rng.randrange(0, 4096))
        kind = f"canary.{self.rng.randrange(100)}"
        task_id = c.submit(kind, payload, queue=self.queue).task_id
        got = c.claim(self.worker, [self.queue], max_tasks=1, wait_ms=2000)
        if [a.task_id for a in got] != [task_id]:
            return f"round_trip: claimed {[a.task_id for a in got]}, expected [{task_id}]"
        a = got[0]
        if a.payload != payload or a.kind != kind or a.attempt != 1 or a.queue != self.queue:
            return f"round_trip: assignment differs from the submitted task: {a.kind} attempt {a.attempt}"
        result = hashlib.sha256(payload).digest()
        c.complete(self.worker, task_id, result)
        info = c.status(task_id)
        if info.state != "completed" or info.result != result or info.attempts != 1:
            return f"round_trip: status after RESULT is {info.state}, attempts {info.attempts}"
        return None

    def priority_batch(self, c: Client) -> str | None:
        tiers = ["low", "high", "normal", 7, 250]
        specs = [m.TaskSpec(kind="canary.batch", payload=str(i).encode(), queue=self.queue, priority=p)
                 for i, p in enumerate(tiers)]
        ids = c.submit_batch(specs)
        if len(ids) != len(specs) or len(set(ids)) != len(ids):
            return f"priority_batch: {len(ids)} ids for {len(specs)} tasks"
        got: list[m.Assignment] = []
        deadline = time.monotonic() + 5
        while len(got) < len(ids) and time.monotonic() < deadline:
            got += c.claim(self.worker, [self.queue], max_tasks=len(ids), wait_ms=500)
        prios = [a.priority for a in got]
        same = sorted(a.task_id for a in got) == sorted(ids)
        if not same or prios != sorted(prios, reverse=True):
            return f"priority_batch: claimed priorities {prios} (the submitted ids: {same})"
        for a in got:
            c.complete(self.worker, a.task_id)
        return None

    def fail_and_cancel(self, c: Client) -> str | None:
        failing = c.submit("canary.fail", b"f", queue=self.queue, max_retries=0).task_id
        got = c.claim(self.worker, [self.queue], wait_ms=2000)
        if [a.task_id for a in got] != [failing]:
            return f"fail_and_cancel: claimed {[a.task_id for a in got]}, expected [{failing}]"
        c.fail(self.worker, failing, "canary failure", retry=False)
        if (state := c.status(failing).state) != "failed":
            return f"fail_and_cancel: failed task is {state}"
        later = c.submit("canary.later", b"l", queue=self.queue, run_at=time.time() + 3600).task_id
        c.cancel(later)
        if (state := c.status(later).state) != "cancelled":
            return f"fail_and_cancel: cancelled task is {state}"
        return None

    def stats(self, c: Client) -> str | None:
        s = c.stats()
        if s.submitted_total < self.last_submitted:
            return f"stats: submitted_total went back from {self.last_submitted} to {s.submitted_total}"
        self.last_submitted = s.submitted_total
        mine = s.queues.get(self.queue)
        if mine is not None and (mine.pending or mine.running):
            return f"stats: canary queue should be empty, has {mine}"
        return None

    def abandoned_claim(self, c: Client) -> str | None:
        """A long-poll CLAIM whose connection died must not swallow the next task of its queue."""
        queue = f"{self.queue}-ab"
        raw = RawConn(self.opts, self.tally)
        raw.send(frame(REQ["CLAIM"], pack({"id": 9, "worker_id": f"{self.worker}-ghost", "queues": [queue],
                                            "max_tasks": 1, "wait_ms": 30_000})))
        time.sleep(0.05)  # let the broker park it before the connection goes
        raw.reset()
        # The broker cannot know of the reset before its reader sees it; under fuzz load that can take a
        # while, and a task handed to a dead waiter meanwhile is only back after its lease. Half a second
        # is far more than a responsive broker needs (it passes 200/200 unloaded with 50 ms).
        time.sleep(0.5)
        task_id = c.submit("canary.after-abandon", b"a", queue=queue).task_id
        got = c.claim(self.worker, [queue], wait_ms=3000)
        if [a.task_id for a in got] != [task_id]:
            info = c.status(task_id)
            return (f"abandoned_claim: task after an abandoned CLAIM went to {info.worker_id or 'nobody'} "
                    f"(state {info.state}) instead of the live worker")
        c.complete(self.worker, task_id)
        return None

    def final_checks(self) -> None:
        """After the fuzzing: a fresh connection works, and the fuzz connections are all gone."""
        try:
            with Client(self.opts.host, self.opts.port, api_key=self.opts.api_key, timeout=10.0,
                        tls=self.opts.tls, ca_file=self.opts.ca_file) as fresh:
                problem = self.round_trip(fresh)
                self.tally.canary(problem is None, f"final: {problem}")
                deadline = time.monotonic() + 10
                connections = fresh.stats().connections
                while connections > 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                    connections = fresh.stats().connections
                ok = connections <= 2  # this one and the canary's own
                self.tally.canary(ok, f"final: {connections} connections still open 10 s after the fuzzing")
        except (BrokerError, ClientError, OSError) as exc:
            self.tally.canary(False, f"final: fresh connection failed: {type(exc).__name__}: {exc}")
        if self.client is not None:
            self.client.close()


# ------------------------------------------------------------------ broker RSS


class RssWatch:
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self.died = False
        self.proc: Any = None
        if pid is not None:
            import psutil

            self.psutil = psutil
            self.proc = psutil.Process(pid)
            self.sample()

    def sample(self) -> None:
        if self.proc is None or self.died:
            return
        try:
            if self.proc.status() == self.psutil.STATUS_ZOMBIE:
                raise self.psutil.NoSuchProcess(self.pid)
            self.samples.append(self.proc.memory_info().rss)
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            self.died = True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.25):
            self.sample()


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


# ------------------------------------------------------------------ main


def broker_reachable(opts: Options) -> bool:
    try:
        with Client(opts.host, opts.port, api_key=opts.api_key, timeout=5.0, tls=opts.tls,
                    ca_file=opts.ca_file) as c:
            c.stats()
        return True
    except (BrokerError, ClientError, OSError):
        return False


def run(opts: Options) -> dict[str, Any]:
    tally = Tally()
    stop = threading.Event()
    watch = RssWatch(opts.pid)
    fuzzer = Fuzzer(opts, tally, stop)
    canary = Canary(opts, tally, stop)
    threads = [threading.Thread(target=fuzzer.run_worker, args=(i,), daemon=True, name=f"fuzz-{i}")
               for i in range(opts.workers)]
    threads.append(threading.Thread(target=canary.run_loop, daemon=True, name="canary"))
    threads.append(threading.Thread(target=watch.run, args=(stop,), daemon=True, name="rss"))
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - started < opts.seconds:
            time.sleep(0.2)
            watch.sample()
            if watch.died:
                break
    except KeyboardInterrupt:
        pass
    stop.set()
    fuzzed = time.monotonic() - started
    for t in threads:
        t.join(timeout=30)
    joined = time.monotonic() - started
    watch.sample()
    if not watch.died:
        canary.final_checks()
        watch.sample()
    elapsed = time.monotonic() - started
    alive = not watch.died and broker_reachable(opts)
    rss = watch.samples
    latency = sorted(tally.canary_latency)
    summary: dict[str, Any] = {
        "seconds": round(elapsed, 1),
        "fuzz_seconds": round(fuzzed, 1),
        "wind_down_seconds": round(joined - fuzzed, 1),
        "final_check_seconds": round(elapsed - joined, 1),
        "target": f"{opts.host}:{opts.port}",
        "seed": opts.seed,
        "frames_sent": dict(sorted(tally.sent.items())),
        "frames_sent_total": sum(tally.sent.values()),
        "errors_by_code": dict(tally.errors.most_common()),
        "replies_by_type": dict(tally.replies.most_common()),
        "connections_opened": tally.connections,
        "connections_closed_by_broker": tally.closed_by_broker,
        "anomalies": dict(tally.anomalies),
        "anomaly_examples": tally.anomaly_examples,
        "canary_ok": tally.canary_ok,
        "canary_failed": tally.canary_failed,
        "canary_failures": tally.canary_failures,
        "canary_latency_p50_s": round(latency[len(latency) // 2], 4) if latency else None,
        "canary_latency_max_s": round(latency[-1], 4) if latency else None,
        "rss_start_bytes": rss[0] if rss else None,
        "rss_end_bytes": rss[-1] if rss else None,
        "rss_max_bytes": max(rss) if rss else None,
        "broker_alive": alive,
    }
    summary["passed"] = alive and tally.canary_failed == 0 and tally.canary_ok > 0
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"fuzz summary: {s['seconds']} s against {s['target']} (seed {s['seed']}; fuzzing {s['fuzz_seconds']} s, "
             f"wind-down {s['wind_down_seconds']} s, final checks {s['final_check_seconds']} s)",
             f"frames sent by kind ({s['frames_sent_total']} in all):"]
    lines += [f"  {k:<14} {v}" for k, v in s["frames_sent"].items()]
    lines.append("errors received by code:")
    lines += [f"  {k:<22} {v}" for k, v in s["errors_by_code"].items()] or ["  (none)"]
    lines.append("replies by type: " + ", ".join(f"{k} {v}" for k, v in s["replies_by_type"].items()))
    lines.append(f"connections: {s['connections_opened']} opened, {s['connections_closed_by_broker']} closed by broker")
    lines.append(f"anomalies: {sum(s['anomalies'].values())}" +
                 "".join(f"\n  {k}: {v}" for k, v in s["anomalies"].items()))
    lines += [f"    e.g. {e}" for e in s["anomaly_examples"][:10]]
    lines.append(f"canary checks: {s['canary_ok']} ok, {s['canary_failed']} failed "
                 f"(latency p50 {s['canary_latency_p50_s']} s, max {s['canary_latency_max_s']} s)")
    lines += [f"    {f}" for f in s["canary_failures"][:10]]
    if s["rss_start_bytes"] is not None:
        lines.append(f"broker RSS: start {mib(s['rss_start_bytes'])}, end {mib(s['rss_end_bytes'])}, "
                     f"max {mib(s['rss_max_bytes'])}")
    else:
        lines.append("broker RSS: not measured (pass --pid)")
    lines.append(f"broker: {'alive' if s['broker_alive'] else 'DEAD or unreachable'}")
    lines.append(f"result: {'PASS' if s['passed'] else 'FAIL'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--pid", type=int, help="the broker's pid: RSS is sampled and its death noticed")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--workers", type=int, default=4, help="fuzzing threads (each on its own connections)")
    p.add_argument("--stall-conns", type=int, default=2, help="16 MiB frames stalled at once (0 = none)")
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME, help="the broker's max_frame_bytes")
    p.add_argument("--api-key", default=os.environ.get("TQ_API_KEY"), help="API key (env TQ_API_KEY)")
    p.add_argument("--tls", action="store_true", help="talk TLS to the broker")
    p.add_argument("--ca-file", default=os.environ.get("TQ_TLS_CA"), help="CA bundle for --tls (env TQ_TLS_CA)")
    p.add_argument("--json", dest="json_path", help="also write the summary as JSON to this file")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    return Options(a.host, a.port, a.seconds, a.pid, seed, a.workers, a.stall_conns, a.max_frame_bytes,
                   a.api_key, a.tls or bool(a.ca_file), a.ca_file, a.json_path, a.quiet)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not broker_reachable(opts):
        print(f"fuzz: broker not reachable at {opts.host}:{opts.port}", file=sys.stderr)
        return 1
    summary = run(opts)
    print(format_summary(summary))
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
