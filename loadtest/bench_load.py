"""The load side of the benchmark: functions that each run in their own process (see bench_procs.run_loads).

Every function talks to the server through `loadtest.rawclient` (one blocking socket, no reader thread)
and returns a plain dict. Times come from `rawclient.now()` (CLOCK_MONOTONIC, shared by all processes),
so a worker process can tell how long a task took since the producer process sent it.
"""

from __future__ import annotations

import selectors
from typing import Any

from loadtest.rawclient import (
    RawClient,
    batch_template,
    now,
    percentile,
    read_stamp,
    submit_template,
)
from transport import messages as m
from transport.frames import encode_frame, encode_frames

CLAIM_MAX = 10


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    values = sorted(latencies_s)
    return {"p50_ms": percentile(values, 50) * 1000, "p99_ms": percentile(values, 99) * 1000,
            "max_ms": (values[-1] * 1000) if values else float("nan")}


def closed_loop(host: str, port: int, seconds: float, payload_bytes: int = 100) -> dict[str, Any]:
    """a. One SUBMIT at a time on one connection: rate and latency percentiles."""
    template = submit_template(payload_bytes)
    latencies: list[float] = []
    with RawClient(host, port) as client:
        send, wait = client.send, client.wait_count
        for i in range(1, 200):  # warm-up
            send(template.frame(i))
            wait(1)
        start = now()
        end = start + seconds
        i = 1000
        t = start
        while t < end:
            send(template.frame(i))
            wait(1)
            t2 = now()
            latencies.append(t2 - t)
            t = t2
            i += 1
        errors = client.scanner.errors, client.scanner.error_text()
    elapsed = t - start
    return {"requests": len(latencies), "seconds": elapsed, "rate": len(latencies) / elapsed,
            **latency_summary(latencies), "errors": errors[0], "error": errors[1]}


def pipelined(host: str, port: int, seconds: float, depth: int = 100, payload_bytes: int = 100) -> dict[str, Any]:
    """b. SUBMITs on one connection with `depth` always in flight: each reply read is answered with as
    many new requests as it completed."""
    template = submit_template(payload_bytes)
    with RawClient(host, port) as client:
        next_id = 1
        client.send(template.frames(next_id, depth))
        next_id += depth
        done = 0
        start = now()
        end = start + seconds
        while True:
            got = client.recv_count()
            if not got:
                continue
            done += got
            t = now()
            if t >= end:
                break
            client.send(template.frames(next_id, got))
            next_id += got
        client.wait_count(next_id - 1 - done)  # drain what is still in flight
        errors = client.scanner.errors, client.scanner.error_text()
    elapsed = t - start
    return {"requests": done, "seconds": elapsed, "rate": done / elapsed, "depth": depth,
            "errors": errors[0], "error": errors[1]}


def batches(host: str, port: int, seconds: float = 0.0, size: int = 1000, count: int = 0,
            payload_bytes: int = 100) -> dict[str, Any]:
    """c. SUBMIT_BATCHes of `size`, one at a time, for `seconds` (or exactly `count` batches)."""
    template = batch_template(size, payload_bytes)
    latencies: list[float] = []
    with RawClient(host, port) as client:
        start = t = now()
        end = start + seconds
        i = 1
        while (count and i <= count) or (not count and t < end):
            client.send(template.frame(i))
            client.wait_count(1)
            t2 = now()
            latencies.append(t2 - t)
            t = t2
            i += 1
        errors = client.scanner.errors, client.scanner.error_text()
    elapsed = t - start
    tasks = len(latencies) * size
    return {"batches": len(latencies), "tasks": tasks, "seconds": elapsed, "rate": tasks / elapsed,
            **latency_summary(latencies), "errors": errors[0], "error": errors[1]}


class _WorkerConn:
    """One worker connection of `drain`: CLAIM, then its RESULTs and the next CLAIM in one write."""

    def __init__(self, host: str, port: int, worker_id: str) -> None:
        self.client = RawClient(host, port)
        self.worker_id = worker_id
        self.ids = 0
        self.outstanding = 0  # RESULT OKs not yet read
        self.claiming = False
        self.done = False
        self.completed = 0
        self.errors: list[str] = []

    def _next(self) -> int:
        self.ids += 1
        return self.ids

    def claim(self, extra: list[m.Message] | None = None, wait_ms: int = 0) -> None:
        msgs = list(extra or [])
        msgs.append(m.Claim(id=self._next(), worker_id=self.worker_id, queues=["default"], max_tasks=CLAIM_MAX,
                            wait_ms=wait_ms))
        self.claiming = True
        self.client.send(encode_frames(msgs))

    def on_readable(self) -> None:
        for reply in self.client.recv_messages():
            if isinstance(reply, m.Assigned):
                self.claiming = False
                if not reply.tasks:
                    self.done = self.outstanding == 0
                    if not self.done:
                        self.claim()
                    continue
                results = [m.Result(id=self._next(), worker_id=self.worker_id, task_id=t.task_id, ok=True)
                           for t in reply.tasks]
                self.outstanding += len(results)
                self.claim(results)
            elif isinstance(reply, m.Ok):
                self.outstanding -= 1
                self.completed += 1
            elif isinstance(reply, m.Error):
                self.outstanding -= 1
                self.errors.append(f"{reply.code}: {reply.message}")


def drain(host: str, port: int, connections: int, worker_prefix: str, max_seconds: float) -> dict[str, Any]:
    """d. `connections` workers on one selector: each claims up to 10 tasks and answers them with pipelined
    RESULTs, until a claim comes back empty (the queue is drained) or `max_seconds` pass."""
    conns = [_WorkerConn(host, port, f"{worker_prefix}-{i}") for i in range(connections)]
    sel = selectors.DefaultSelector()
    for conn in conns:
        sel.register(conn.client.sock, selectors.EVENT_READ, conn)
    start = now()
    for conn in conns:
        conn.claim()
    deadline = start + max_seconds
    live = len(conns)
    while live and now() < deadline:
        for key, _ in sel.select(timeout=0.5):
            conn = key.data
            conn.on_readable()
            if conn.done:
                sel.unregister(conn.client.sock)
                live -= 1
    end = now()
    for conn in conns:
        conn.client.close()
    errors = [e for conn in conns for e in conn.errors]
    return {"completed": sum(c.completed for c in conns), "start": start, "end": end, "seconds": end - start,
            "errors": len(errors), "error": errors[0] if errors else ""}


def paced_submit(host: str, port: int, rate: float, seconds: float, stamped: bool = False,
                 payload_bytes: int = 100) -> dict[str, Any]:
    """f (and e's producer). Open loop: SUBMITs leave on a fixed schedule whatever the replies do (the
    socket never blocks the sender). Latency counts from the moment each request was written; how late
    the sender itself was against the schedule (timer granularity, OS scheduling) is reported apart as
    the send lag, so it is not charged to the server. Replies are matched by id, or in order when the
    server answers with id 0 (the echo server)."""
    template = submit_template(payload_bytes, stamped=stamped)
    interval = 1.0 / rate
    total = int(rate * seconds)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    lags: list[float] = []
    with RawClient(host, port) as client:
        sel = selectors.DefaultSelector()
        sel.register(client.sock, selectors.EVENT_READ)
        start = now() + 0.05
        sent = 0
        last_send = start
        while len(latencies) < total:
            t = now()
            due = min(total, int((t - start) / interval) + 1) if t >= start else 0
            if due > sent:
                frames = []
                for i in range(sent, due):
                    sent_at[i + 1] = t
                    lags.append(t - (start + i * interval))
                    frames.append(template.frame(i + 1, t if stamped else None))
                client.send(b"".join(frames))
                last_send = t
                sent = due
            next_at = start + sent * interval if sent < total else t + 1.0
            timeout = max(0.0, next_at - now())
            if sel.select(timeout=timeout):
                got = now()
                for reply in client.recv_messages():
                    if isinstance(reply, m.Error):
                        raise RuntimeError(f"SUBMIT failed: {reply.code}: {reply.message}")
                    key = reply.id if reply.id else next(iter(sent_at))
                    latencies.append(got - sent_at.pop(key))
            if now() > start + seconds + 30:
                raise RuntimeError(f"paced submit: {total - len(latencies)} replies missing after 30 s")
    lags.sort()
    return {"offered_rate": rate, "requests": total, "seconds": last_send - start,
            "achieved_rate": total / max(last_send - start, 1e-9), **latency_summary(latencies),
            "send_lag_p99_ms": percentile(lags, 99) * 1000, "send_lag_max_ms": lags[-1] * 1000}


def waiting_worker(host: str, port: int, expected: int, max_seconds: float, ready: Any = None) -> dict[str, Any]:
    """e's worker: always has a long-poll CLAIM waiting; for each task, the time since the producer's
    scheduled send (stamped in its payload) until its ASSIGNED was read here."""
    worker_id = "bench-waiting-worker"
    latencies: list[float] = []
    ids = 0
    with RawClient(host, port) as client:
        ids += 1
        client.send(encode_frame(m.Claim(id=ids, worker_id=worker_id, queues=["default"], max_tasks=CLAIM_MAX,
                                         wait_ms=5000)))
        if ready is not None:
            ready.set()
        deadline = now() + max_seconds
        while len(latencies) < expected and now() < deadline:
            replies = client.recv_messages()
            got = now()
            out: list[m.Message] = []
            for reply in replies:
                if isinstance(reply, m.Assigned):
                    for task in reply.tasks:
                        latencies.append(got - read_stamp(task.payload))
                        ids += 1
                        out.append(m.Result(id=ids, worker_id=worker_id, task_id=task.task_id, ok=True))
                    ids += 1
                    out.append(m.Claim(id=ids, worker_id=worker_id, queues=["default"], max_tasks=CLAIM_MAX,
                                       wait_ms=5000))
                elif isinstance(reply, m.Error):
                    raise RuntimeError(f"worker: {reply.code}: {reply.message}")
            if out:
                client.send(encode_frames(out))
    return {"tasks": len(latencies), **latency_summary(latencies)}


def python_client_closed_loop(host: str, port: int, seconds: float, payload_bytes: int = 100) -> dict[str, Any]:
    """a, for reference: one SUBMIT at a time through the project's Python client (reader thread and all)."""
    from transport.client import Client

    payload = b"x" * payload_bytes
    latencies: list[float] = []
    with Client(host, port, client_name="bench") as client:
        for _ in range(200):
            client.submit("bench.noop", payload)
        start = t = now()
        end = start + seconds
        while t < end:
            client.submit("bench.noop", payload)
            t2 = now()
            latencies.append(t2 - t)
            t = t2
    elapsed = t - start
    return {"requests": len(latencies), "seconds": elapsed, "rate": len(latencies) / elapsed,
            **latency_summary(latencies), "errors": 0, "error": ""}
