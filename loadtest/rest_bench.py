"""REST API figures: `python -m loadtest.rest_bench [--seconds S] [--dashboard]`.

Starts its own broker (a subprocess, default settings but the REST API on a free loopback port and
broker.queue_depth_threshold raised so nothing is refused) and measures from this process, over one
keep-alive HTTP/1.1 connection (http.client):

- single: POST /api/v1/tasks one at a time (each waits for its 201), for S seconds: tasks/s, p50, p99;
- the same from a bare socket (one send per request, no http.client parsing): the server's share;
- reference: the same submit over TCP (loadtest.rawclient), to read the REST figures against;
- ceiling: the same client against gevent.pywsgi serving an app that does nothing (loadtest.wsgi_ceiling):
  what the server the REST API runs on allows on this machine;
- batch: POST /api/v1/tasks/batch of 1,000 tasks, one at a time, for S seconds: tasks/s;
- --dashboard: with the broker stopped, 1,000,000 rows are written straight into task_history
  (finished over the last hour, 20 kinds, 5 % failed); then the broker starts, 100,000 tasks are
  submitted (pending), and GET / (the overview) is timed 20 times: the first (charts computed from
  history) and the p50 and max of the other 19 (charts reused for 10 s, live counts fresh).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from loadtest.bench_procs import HOST, ROOT, Broker, free_port, wait_listening

BATCH = 1000


def _connect(port: int, timeout: float = 60) -> http.client.HTTPConnection:
    """A keep-alive connection with TCP_NODELAY (as curl and most HTTP clients set it): http.client writes
    the headers and the body separately, and without it the body waits for the server's delayed ACK."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def single(port: int, seconds: float) -> dict[str, Any]:
    conn = _connect(port)
    body = json.dumps({"kind": "bench.noop", "queue": "bench", "payload": {"n": 1}}).encode()
    for _ in range(200):  # warm-up: connection, imports, first allocations
        _post(conn, "/api/v1/tasks", body)
    latencies = []
    deadline = time.perf_counter() + seconds
    while (start := time.perf_counter()) < deadline:
        status, _ = _post(conn, "/api/v1/tasks", body)
        latencies.append(time.perf_counter() - start)
        assert status == 201, status
    conn.close()
    latencies.sort()
    return {"requests": len(latencies), "per_s": len(latencies) / sum(latencies),
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def batch(port: int, seconds: float) -> dict[str, Any]:
    conn = _connect(port)
    body = json.dumps({"tasks": [{"kind": "bench.noop", "queue": "batch", "payload": {"n": i}}
                                 for i in range(BATCH)]}).encode()
    _post(conn, "/api/v1/tasks/batch", body)
    tasks, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        status, _ = _post(conn, "/api/v1/tasks/batch", body)
        assert status == 201, status
        tasks += BATCH
    elapsed = time.perf_counter() - started
    conn.close()
    return {"tasks": tasks, "tasks_per_s": tasks / elapsed}


def raw_single(port: int, seconds: float) -> dict[str, Any]:
    """POST /api/v1/tasks one at a time from a bare keep-alive socket: the request written in one send,
    the reply read up to its Content-Length. What the server costs, without http.client's own parsing."""
    body = json.dumps({"kind": "bench.noop", "queue": "raw", "payload": {"n": 1}}).encode()
    request = (f"POST /api/v1/tasks HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies, buffer = [], b""
    deadline = time.perf_counter() + seconds
    while (start := time.perf_counter()) < deadline:
        sock.sendall(request)
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                length = int(buffer[:head_end].lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(buffer) >= head_end + 4 + length:
                    assert buffer.startswith(b"HTTP/1.1 201"), buffer[:100]
                    buffer = buffer[head_end + 4 + length:]
                    break
            buffer += sock.recv(65536)
        latencies.append(time.perf_counter() - start)
    sock.close()
    latencies.sort()
    return {"requests": len(latencies), "per_s": len(latencies) / sum(latencies),
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def tcp_single(port: int, seconds: float) -> dict[str, Any]:
    """The same submit over the TCP protocol (figure a's raw client), in the same minute: a reference
    that the machine's momentary load affects as it affects the REST figures."""
    from loadtest.rawclient import RawClient, submit_template

    template = submit_template(payload_bytes=10, queue="tcp")
    latencies = []
    with RawClient(HOST, port) as client:
        deadline, request_id = time.perf_counter() + seconds, 0
        while (start := time.perf_counter()) < deadline:
            request_id += 1
            client.send(template.frame(request_id))
            client.wait_count(1)
            latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {"requests": len(latencies), "per_s": len(latencies) / sum(latencies),
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def fill_history(db_path: Any, rows: int) -> float:
    """Writes `rows` finished tasks into task_history directly (the broker must be stopped)."""
    import duckdb

    started = time.perf_counter()
    with duckdb.connect(str(db_path)) as db:
        db.execute(f"""INSERT INTO task_history
            SELECT 'h' || i, 'q' || (i % 10), 'kind.' || (i % 20), 150, CASE WHEN i % 20 = 0 THEN 'failed'
                   ELSE 'completed' END, 1, 3, 'w' || (i % 50),
                   now()::TIMESTAMP - INTERVAL (i % 3600) SECOND, now()::TIMESTAMP - INTERVAL (i % 3600) SECOND,
                   now()::TIMESTAMP - INTERVAL (i % 3600) SECOND, now()::TIMESTAMP - INTERVAL (i % 3600) SECOND
                   + INTERVAL ((i % 997) * 1000) MICROSECOND, (i % 997) / 1.0, 10, NULL, NULL
            FROM range({rows}) t(i)""")
        db.execute("CHECKPOINT")
    return time.perf_counter() - started


def dashboard(rows: int, pending: int) -> dict[str, Any]:
    rest_port = free_port()
    overrides = {"TQ_API__REST_PORT": str(rest_port), "TQ_API__REST_HOST": HOST,
                 "TQ_BROKER__QUEUE_DEPTH_THRESHOLD": "100000000"}
    broker = Broker(**overrides)
    try:
        broker.start()
        wait_listening(rest_port, broker.proc, "REST API")  # type: ignore[arg-type]
        broker.terminate()
        fill_s = fill_history(broker.dir / "data" / "tqbroker.duckdb", rows)
        broker.start()
        wait_listening(rest_port, broker.proc, "REST API")  # type: ignore[arg-type]
        conn = _connect(rest_port)
        body = json.dumps({"tasks": [{"kind": "bench.pending", "queue": f"p{i % 5}", "priority": i % 256}
                                     for i in range(BATCH)]}).encode()
        for _ in range(pending // BATCH):
            assert _post(conn, "/api/v1/tasks/batch", body)[0] == 201
        times = []
        for _ in range(20):
            start = time.perf_counter()
            conn.request("GET", "/")
            resp = conn.getresponse()
            page = resp.read()
            times.append(time.perf_counter() - start)
            assert resp.status == 200 and b"max " in page
        conn.close()
    finally:
        broker.cleanup()
    return {"history_rows": rows, "pending": pending, "fill_s": fill_s, "overview_cold_ms": times[0] * 1000,
            "overview_p50_ms": statistics.median(times[1:]) * 1000, "overview_max_ms": max(times[1:]) * 1000}


def run_rest(seconds: float) -> dict[str, Any]:
    """Figure i (single, bare socket, TCP reference, batch) against a fresh broker; also `make bench`'s."""
    rest_port = free_port()
    broker = Broker(TQ_API__REST_PORT=str(rest_port), TQ_API__REST_HOST=HOST,
                    TQ_BROKER__QUEUE_DEPTH_THRESHOLD="100000000")
    try:
        broker.start()
        wait_listening(rest_port, broker.proc, "REST API")  # type: ignore[arg-type]
        return {"single": single(rest_port, seconds), "raw": raw_single(rest_port, seconds),
                "tcp": tcp_single(broker.port, seconds), "batch": batch(rest_port, seconds),
                "ceiling": ceiling(seconds)}
    finally:
        broker.cleanup()


def ceiling(seconds: float) -> dict[str, Any]:
    """`single` against gevent.pywsgi with an app that does nothing (loadtest.wsgi_ceiling)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "loadtest.wsgi_ceiling", str(port)], cwd=ROOT)
    try:
        wait_listening(port, server, "gevent.pywsgi ceiling")
        return single(port, seconds)
    finally:
        server.kill()
        server.wait()


def report(figures: dict[str, Any]) -> str:
    one, raw, tcp, many, top = (figures[k] for k in ("single", "raw", "tcp", "batch", "ceiling"))
    return "\n".join([
        f"i1 POST /api/v1/tasks, one at a time, keep-alive (http.client): {one['requests']} requests, "
        f"{one['per_s']:,.0f}/s, p50 {one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms (goal >= 3,000/s, p99 <= 5 ms)",
        f"i1' the same from a bare socket (no http.client): {raw['requests']} requests, {raw['per_s']:,.0f}/s, "
        f"p50 {raw['p50_ms']:.2f} ms, p99 {raw['p99_ms']:.2f} ms",
        f"   reference, TCP SUBMIT one at a time (raw client): {tcp['requests']} requests, {tcp['per_s']:,.0f}/s, "
        f"p50 {tcp['p50_ms']:.2f} ms, p99 {tcp['p99_ms']:.2f} ms",
        f"   ceiling, gevent.pywsgi with an app that does nothing (same client as i1): {top['requests']} requests, "
        f"{top['per_s']:,.0f}/s, p50 {top['p50_ms']:.2f} ms, p99 {top['p99_ms']:.2f} ms",
        f"i2 POST /api/v1/tasks/batch of {BATCH}: {many['tasks']} tasks, {many['tasks_per_s']:,.0f} tasks/s "
        "(goal >= 50,000/s)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.rest_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each submit figure")
    parser.add_argument("--dashboard", action="store_true", help="also time the overview page on 1M history rows")
    parser.add_argument("--history-rows", type=int, default=1_000_000)
    parser.add_argument("--pending", type=int, default=100_000)
    args = parser.parse_args(argv)
    print(report(run_rest(args.seconds)))
    if args.dashboard:
        page = dashboard(args.history_rows, args.pending)
        print(f"i3 GET / (overview) with {page['history_rows']:,} history rows (all in the last hour) and "
              f"{page['pending']:,} pending: first {page['overview_cold_ms']:.0f} ms (charts computed), next 19 "
              f"(charts reused, 10 s) p50 {page['overview_p50_ms']:.0f} ms, max {page['overview_max_ms']:.0f} ms "
              f"(goal <= 200 ms; history written in {page['fill_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
