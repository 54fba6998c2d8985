"""The fuzz kinds (`do_<kind>` of `Fuzzer`) of `python -m loadtest.fuzz`; its docstring lists them.

Each kind opens its own raw connection, sends its garbage, and checks the broker's answer: a reply where
one is due, a BAD_FRAME / FRAME_TOO_LARGE and a close where the stream cannot go on, a refusal for
writing SQL. What does not hold is counted as an anomaly in the shared `Tally`.
"""

from __future__ import annotations

import random
import ssl
import struct
import threading
import time

from loadtest.fuzz_gen import Gen
from loadtest.fuzz_wire import REPLY_TIMEOUT_S, REQ, Options, RawConn, Tally, frame, pack
from transport import messages as m

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


class Fuzzer:
    """The fuzz threads' work: each `run_worker` picks kinds by KIND_WEIGHTS until stopped."""

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
