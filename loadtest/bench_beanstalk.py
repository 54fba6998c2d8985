"""beanstalkd as a peer: the server (binlog on, fsync every 100 ms like tqbroker's interval) and load
functions that speak its text protocol on one blocking socket, the same way loadtest/rawclient.py speaks
ours (pipelining is a property of the protocol, not of a client library; greenstalk cannot pipeline).

beanstalkd has no batch put and no batch reserve: c is 1,000 puts written at once (one round trip), and
d's workers keep 10 `reserve-with-timeout 0` in flight per connection (a claim of up to 10).
"""

from __future__ import annotations

import selectors
import shutil
import socket
from typing import Any

from loadtest.bench_load import latency_summary
from loadtest.bench_procs import HOST, Server
from loadtest.rawclient import now

PUT_PRI, PUT_TTR = 1024, 60


def available() -> str | None:
    """None when beanstalkd can run here, else why not."""
    return None if shutil.which("beanstalkd") else "beanstalkd not installed (apt-get install beanstalkd)"


class Beanstalkd(Server):
    name = "beanstalkd"

    def command(self) -> list[str]:
        binlog = self.dir / "binlog"
        binlog.mkdir(exist_ok=True)
        return ["beanstalkd", "-l", HOST, "-p", str(self.port), "-b", str(binlog), "-f", "100"]


def put_cmd(payload: bytes) -> bytes:
    return b"put %d 0 %d %d\r\n%s\r\n" % (PUT_PRI, PUT_TTR, len(payload), payload)


def stamped_put(at: float, size: int = 100) -> bytes:
    import struct

    body = struct.pack(">d", at) + b"x" * (size - 8)
    return put_cmd(body)


class Conn:
    """One blocking beanstalkd connection with a reply parser (lines, and RESERVED's job body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)  # blocking like rawclient.RawClient: no poll() before each recv()
        self.buf = b""
        self._rbuf = bytearray(1 << 20)
        self._rview = memoryview(self._rbuf)
        self.errors = 0
        self.first_error = ""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self) -> list[tuple[bytes, bytes]]:
        """Blocks for one read; each complete reply as (line, job body or b"")."""
        n = self.sock.recv_into(self._rbuf)  # a reused buffer, as rawclient.RawClient.recv explains
        if not n:
            raise ConnectionError("beanstalkd closed the connection")
        data = self._rview[:n].tobytes()
        buf = self.buf + data
        out, pos = [], 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            body = b""
            nxt = eol + 2
            if line.startswith((b"RESERVED ", b"OK ")):
                size = int(line.rsplit(b" ", 1)[1])
                if len(buf) < nxt + size + 2:
                    break
                body = buf[nxt : nxt + size]
                nxt += size + 2
            elif not line.startswith((b"INSERTED", b"DELETED", b"TIMED_OUT", b"USING", b"WATCHING")):
                self.errors += 1
                self.first_error = self.first_error or line.decode(errors="replace")
            out.append((line, body))
            pos = nxt
        self.buf = buf[pos:]
        return out

    def wait(self, n: int) -> list[tuple[bytes, bytes]]:
        got: list[tuple[bytes, bytes]] = []
        while len(got) < n:
            got += self.replies()
        return got

    def close(self) -> None:
        self.sock.close()


def closed_loop(port: int, seconds: float, payload_bytes: int = 100) -> dict[str, Any]:
    cmd = put_cmd(b"x" * payload_bytes)
    conn = Conn(port)
    for _ in range(200):
        conn.send(cmd)
        conn.wait(1)
    latencies = []
    start = t = now()
    while t < start + seconds:
        conn.send(cmd)
        conn.wait(1)
        t2 = now()
        latencies.append(t2 - t)
        t = t2
    conn.close()
    return {"requests": len(latencies), "seconds": t - start, "rate": len(latencies) / (t - start),
            **latency_summary(latencies), "errors": conn.errors, "error": conn.first_error}


def greenstalk_closed_loop(port: int, seconds: float, payload_bytes: int = 100) -> dict[str, Any]:
    """a, for reference: one put at a time through greenstalk, beanstalkd's common Python client."""
    import greenstalk

    body = b"x" * payload_bytes
    latencies = []
    with greenstalk.Client((HOST, port), encoding=None) as client:
        for _ in range(200):
            client.put(body, priority=PUT_PRI, ttr=PUT_TTR)
        start = t = now()
        while t < start + seconds:
            client.put(body, priority=PUT_PRI, ttr=PUT_TTR)
            t2 = now()
            latencies.append(t2 - t)
            t = t2
    return {"requests": len(latencies), "seconds": t - start, "rate": len(latencies) / (t - start),
            **latency_summary(latencies), "errors": 0, "error": ""}


def pipelined(port: int, seconds: float, depth: int = 100, payload_bytes: int = 100) -> dict[str, Any]:
    cmd = put_cmd(b"x" * payload_bytes)
    conn = Conn(port)
    conn.send(cmd * depth)
    sent, done = depth, 0
    start = now()
    while True:
        got = len(conn.replies())
        done += got
        t = now()
        if t >= start + seconds:
            break
        if got:
            conn.send(cmd * got)
            sent += got
    conn.wait(sent - done)
    conn.close()
    return {"requests": done, "seconds": t - start, "rate": done / (t - start), "depth": depth,
            "errors": conn.errors, "error": conn.first_error}


def batches(port: int, seconds: float = 0.0, size: int = 1000, count: int = 0,
            payload_bytes: int = 100) -> dict[str, Any]:
    block = put_cmd(b"x" * payload_bytes) * size
    conn = Conn(port)
    latencies = []
    start = t = now()
    while (count and len(latencies) < count) or (not count and t < start + seconds):
        conn.send(block)
        conn.wait(size)
        t2 = now()
        latencies.append(t2 - t)
        t = t2
    conn.close()
    tasks = len(latencies) * size
    return {"batches": len(latencies), "tasks": tasks, "seconds": t - start, "rate": tasks / (t - start),
            **latency_summary(latencies), "errors": conn.errors, "error": conn.first_error}


def drain(port: int, connections: int, max_seconds: float, claim: int = 10) -> dict[str, Any]:
    """d: each connection keeps `claim` reserves in flight; each job is deleted with the next reserve."""
    reserve = b"reserve-with-timeout 0\r\n"
    sel = selectors.DefaultSelector()
    conns = [Conn(port) for _ in range(connections)]
    state = {id(c): claim for c in conns}  # reserves in flight
    completed = 0
    start = now()
    for conn in conns:
        sel.register(conn.sock, selectors.EVENT_READ, conn)
        conn.send(reserve * claim)
    live = len(conns)
    while live and now() < start + max_seconds:
        for key, _ in sel.select(timeout=0.5):
            conn = key.data
            out = []
            for line, _body in conn.replies():
                if line.startswith(b"RESERVED"):
                    state[id(conn)] -= 1
                    out.append(b"delete %s\r\n" % line.split()[1] + reserve)
                    state[id(conn)] += 1
                elif line.startswith(b"DELETED"):
                    completed += 1
                elif line.startswith(b"TIMED_OUT"):
                    state[id(conn)] -= 1
            if out:
                conn.send(b"".join(out))
            elif state[id(conn)] == 0:
                sel.unregister(conn.sock)
                live -= 1
    end = now()
    for conn in conns:
        conn.close()
    return {"completed": completed, "start": start, "end": end, "seconds": end - start,
            "errors": sum(c.errors for c in conns), "error": next((c.first_error for c in conns if c.errors), "")}


def paced_put(port: int, rate: float, seconds: float, stamped: bool = False) -> dict[str, Any]:
    """f (and e's producer), as bench_load.paced_submit: open loop, latency from the actual write, send lag
    apart; beanstalkd answers in order, so a FIFO of send times matches replies."""
    from collections import deque

    from loadtest.rawclient import percentile

    plain = put_cmd(b"x" * 100)
    interval, total = 1.0 / rate, int(rate * seconds)
    conn = Conn(port)
    sel = selectors.DefaultSelector()
    sel.register(conn.sock, selectors.EVENT_READ)
    sent_at: deque[float] = deque()
    latencies: list[float] = []
    lags: list[float] = []
    start = last_send = now() + 0.05
    sent = 0
    while len(latencies) < total:
        t = now()
        due = min(total, int((t - start) / interval) + 1) if t >= start else 0
        if due > sent:
            sent_at.extend([t] * (due - sent))
            lags.extend(t - (start + i * interval) for i in range(sent, due))
            conn.send((stamped_put(t) if stamped else plain) * (due - sent))
            sent, last_send = due, t
        next_at = start + sent * interval if sent < total else t + 1.0
        if sel.select(timeout=max(0.0, next_at - now())):
            got = now()
            for _ in conn.replies():
                latencies.append(got - sent_at.popleft())
    conn.close()
    lags.sort()
    return {"offered_rate": rate, "requests": total, "seconds": last_send - start,
            "achieved_rate": total / max(last_send - start, 1e-9), **latency_summary(latencies),
            "send_lag_p99_ms": percentile(lags, 99) * 1000, "send_lag_max_ms": lags[-1] * 1000,
            "errors": conn.errors, "error": conn.first_error}


def waiting_worker(port: int, expected: int, max_seconds: float, ready: Any = None) -> dict[str, Any]:
    import struct

    conn = Conn(port)
    conn.send(b"reserve-with-timeout 5\r\n")
    if ready is not None:
        ready.set()
    latencies: list[float] = []
    deadline = now() + max_seconds
    while len(latencies) < expected and now() < deadline:
        replies = conn.replies()
        got = now()
        out = []
        for line, body in replies:
            if line.startswith(b"RESERVED"):
                latencies.append(got - struct.unpack_from(">d", body)[0])
                out.append(b"delete %s\r\nreserve-with-timeout 5\r\n" % line.split()[1])
            elif line.startswith(b"TIMED_OUT"):
                out.append(b"reserve-with-timeout 5\r\n")
        if out:
            conn.send(b"".join(out))
    conn.close()
    return {"tasks": len(latencies), **latency_summary(latencies)}


def ready_jobs(port: int) -> int:
    conn = Conn(port)
    conn.send(b"stats\r\n")
    (_line, body), = conn.wait(1)
    conn.close()
    for row in body.decode().splitlines():
        if row.startswith("current-jobs-ready:"):
            return int(row.split(":")[1])
    raise RuntimeError("beanstalkd stats has no current-jobs-ready")
