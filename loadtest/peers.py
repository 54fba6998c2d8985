"""The same figures against peers: beanstalkd (binlog on) and Redis (AOF everysec) with RQ, Dramatiq, Celery.

Each peer runs as its own server subprocess, driven from separate load processes like tqbroker. What each
figure means for a peer is printed under the side-by-side table (`_about`): where a peer has no such
operation the figure says n/a rather than being stood in for by something else. Peer client libraries come
from the `bench` extra (`pip install -e '.[bench]'`); a peer whose server or library is missing is skipped
with the reason.
"""

from __future__ import annotations

import time
from typing import Any

from loadtest import bench_beanstalk as bs
from loadtest.bench_procs import measured
from loadtest.bench_tq import DRAIN_PROCESSES, E_RATE, F_RATE, G_TASKS, H_TASKS, MB, Mode, log

Results = dict[str, dict[str, Any]]


def _figure(server: Any, fn: Any, **kwargs: Any) -> dict[str, Any]:
    return measured(server, (fn, {"port": server.port, **kwargs}))[0]


def _combine_drain(parts: list[dict[str, Any]]) -> dict[str, Any]:
    completed = sum(p["completed"] for p in parts)
    seconds = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    return {"completed": completed, "seconds": seconds, "rate": completed / seconds,
            "errors": sum(p["errors"] for p in parts), "error": next((p["error"] for p in parts if p["error"]), ""),
            **{k: v for k, v in parts[0].items() if k.endswith("_cpu_pct")}}


def run_beanstalkd(mode: Mode) -> Results:
    why = bs.available()
    if why:
        return {"_about": {"text": f"skipped: {why}"}}
    res: Results = {"_about": {"text": (
        "beanstalkd 1.12 -b binlog -f 100 (fsync every 100 ms), its text protocol on one blocking socket "
        "per connection (same style as rawclient), greenstalk for the client-library row; c ="
        " 1,000 puts in one write (no batch command); d = 10 "
        "connections with 10 reserve-with-timeout 0 in flight each, delete pipelined with the next reserve")}}
    secs = mode.seconds
    with bs.Beanstalkd() as server:
        log("beanstalkd a/b/c")
        res["a"] = _figure(server, bs.closed_loop, seconds=secs)
        res["a_py"] = _figure(server, bs.greenstalk_closed_loop, seconds=secs)
        res["b"] = _figure(server, bs.pipelined, seconds=secs, depth=100)
        res["c"] = _figure(server, bs.batches, seconds=secs, size=1000)
    with bs.Beanstalkd() as server:
        log(f"beanstalkd d: prefilling {mode.drain_tasks:,} jobs")
        measured(None, (bs.batches, {"port": server.port, "size": 1000, "count": mode.drain_tasks // 1000}))
        per = 10 // DRAIN_PROCESSES
        res["d"] = _combine_drain(measured(server, *[(bs.drain, {"port": server.port, "connections": per,
                                                                 "max_seconds": 120.0})
                                                     for _ in range(DRAIN_PROCESSES)]))
    with bs.Beanstalkd() as server:
        log("beanstalkd e/f")
        worker, producer = measured(
            server,
            (bs.waiting_worker, {"port": server.port, "expected": int(E_RATE * secs), "max_seconds": secs + 30}),
            (bs.paced_put, {"port": server.port, "rate": E_RATE, "seconds": secs, "stamped": True}),
            ready_first=True)
        res["e"] = {**worker, "offered_rate": E_RATE, "achieved_rate": producer["achieved_rate"],
                    "submit_p99_ms": producer["p99_ms"], "send_lag_p99_ms": producer["send_lag_p99_ms"]}
        res["f"] = _figure(server, bs.paced_put, rate=F_RATE, seconds=secs)
    with bs.Beanstalkd() as server:
        log("beanstalkd g")
        time.sleep(0.3)
        idle = server.rss_bytes()
        measured(None, (bs.batches, {"port": server.port, "size": 1000, "count": G_TASKS // 1000}))
        time.sleep(1.0)
        rss = server.rss_bytes()
        res["g"] = {"rss_mb": rss / MB, "idle_mb": idle / MB, "delta_mb": (rss - idle) / MB,
                    "pending": bs.ready_jobs(server.port)}
    if mode.full:
        res["h"] = _restart(bs.Beanstalkd(), lambda port: bs.ready_jobs(port),
                            lambda port: measured(None, (bs.batches, {"port": port, "size": 10_000,
                                                                      "count": H_TASKS // 10_000})))
    return res


def _restart(server: Any, count: Any, fill: Any, settle_s: float = 0.3) -> dict[str, Any]:
    """h for a peer: fill with H_TASKS, kill -9, time the start until `count` answers with all of them."""
    with server:
        log(f"{server.name} h: filling {H_TASKS:,} tasks")
        fill(server.port)
        out: dict[str, Any] = {"tasks": H_TASKS, "rss_mb": server.rss_bytes() / MB}
        time.sleep(settle_s)  # let an fsync interval pass, as for tqbroker (which acknowledges after write)
        server.kill()
        start = time.monotonic()
        server.start()
        out["kill9_pending"] = count(server.port)
        out["restart_s"] = out["kill9_restart_s"] = time.monotonic() - start
        log(f"{server.name} h: restart after kill -9: {out['restart_s']:.1f} s, {out['kill9_pending']:,} back")
    return out


def run_peers(mode: Mode, tq: Results) -> dict[str, Results]:
    from loadtest import bench_redis

    peers: dict[str, Results] = {"beanstalkd": run_beanstalkd(mode)}
    peers.update(bench_redis.run_redis_peers(mode))
    return peers
