"""Redis-backed peers: RQ, Dramatiq and Celery on `redis-server` with AOF (appendfsync everysec).

Their producers are their own client libraries (there is no other way to submit an RQ job or a Celery
task), each in a separate load process, through one generic set of load functions and a small adapter per
system (`loadtest.bench_rq`, `bench_dramatiq`, `bench_celery`). Their workers are their own worker CLIs
with 10-way concurrency. Every benchmark task does one Redis INCR (or RPUSH of its latency) so the
benchmark can count completions without watching each system's internals; it is stated in the output.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import time
from typing import Any

from loadtest.bench_load import latency_summary
from loadtest.bench_procs import HOST, ROOT, Server, measured
from loadtest.bench_tq import E_RATE, F_RATE, G_TASKS, H_TASKS, MB, Mode, log
from loadtest.rawclient import now

PAYLOAD = "x" * 100  # JSON-encodable for Dramatiq and Celery; the same 100 bytes for RQ
DONE_KEY = "bench:done"
LAT_KEY = "bench:lat"
SYSTEMS = {"rq": "loadtest.bench_rq", "dramatiq": "loadtest.bench_dramatiq", "celery": "loadtest.bench_celery"}
DRAIN_TASKS = {"quick": 5_000, "default": 20_000, "full": 50_000}


class Redis(Server):
    name = "redis"

    def command(self) -> list[str]:
        return ["redis-server", "--bind", HOST, "--port", str(self.port), "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"]

    def client(self) -> Any:
        import redis

        return redis.Redis(host=HOST, port=self.port)

    def start(self) -> Redis:
        super().start()
        client = self.client()
        deadline = time.monotonic() + 120
        while True:  # listening comes before the AOF is loaded; PING says LOADING until then
            try:
                client.ping()
                return self
            except Exception:  # redis.BusyLoadingError while the AOF loads
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def available(system: str) -> str | None:
    if not shutil.which("redis-server"):
        return "redis-server not installed (apt-get install redis-server)"
    try:
        importlib.import_module(SYSTEMS[system])
    except ImportError as exc:
        return f"{exc.name} not installed (pip install -e '.[bench]')"
    return None


def adapter(system: str, port: int) -> Any:
    os.environ["BENCH_REDIS_PORT"] = str(port)  # read by the task modules when imported
    return importlib.import_module(SYSTEMS[system])


# ------------------------------------------------------------ tasks' side (run inside the peers' workers)

_redis: Any = None


def _conn() -> Any:
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis(host=HOST, port=int(os.environ["BENCH_REDIS_PORT"]))
    return _redis


def task_done(payload: str) -> None:
    _conn().incr(DONE_KEY)


def task_latency(stamp: float, payload: str) -> None:
    _conn().rpush(LAT_KEY, now() - stamp)


# ------------------------------------------------------------ load functions (own processes)


def lib_closed_loop(system: str, port: int, seconds: float) -> dict[str, Any]:
    submit = adapter(system, port).Producer(port).submit
    for _ in range(100):
        submit(PAYLOAD)
    latencies = []
    start = t = now()
    while t < start + seconds:
        submit(PAYLOAD)
        t2 = now()
        latencies.append(t2 - t)
        t = t2
    return {"requests": len(latencies), "seconds": t - start, "rate": len(latencies) / (t - start),
            **latency_summary(latencies), "errors": 0, "error": ""}


def lib_batches(system: str, port: int, seconds: float = 0.0, size: int = 1000, count: int = 0) -> dict[str, Any]:
    producer = adapter(system, port).Producer(port)
    latencies = []
    start = t = now()
    while (count and len(latencies) < count) or (not count and t < start + seconds):
        producer.submit_many(size, PAYLOAD)
        t2 = now()
        latencies.append(t2 - t)
        t = t2
    tasks = len(latencies) * size
    return {"batches": len(latencies), "tasks": tasks, "seconds": t - start, "rate": tasks / (t - start),
            **latency_summary(latencies), "errors": 0, "error": ""}


def lib_prefill(system: str, port: int, count: int) -> dict[str, Any]:
    producer = adapter(system, port).Producer(port)
    singles = count
    if getattr(producer, "submit_many", None) is not None:
        for _ in range(count // 1000):
            producer.submit_many(1000, PAYLOAD)
        singles = count % 1000
    for _ in range(singles):
        producer.submit(PAYLOAD)
    return {"tasks": count}


def lib_paced(system: str, port: int, rate: float, seconds: float, stamped: bool = False) -> dict[str, Any]:
    """As bench_load.paced_submit, as far as a blocking library allows: each call starts at its scheduled
    time or, once the calls fall behind, at once; latency is the call's own time, the lag against the
    schedule is reported apart, and `achieved_rate` says what rate the library could really offer.
    Stops after 3 x `seconds`."""
    from loadtest.rawclient import percentile

    producer = adapter(system, port).Producer(port)
    interval, total = 1.0 / rate, int(rate * seconds)
    latencies, lags = [], []
    start = now() + 0.05
    for i in range(total):
        at = start + i * interval
        wait = at - now()
        if wait > 0:
            time.sleep(wait)
        t = now()
        if stamped:
            producer.submit_stamped(t, PAYLOAD)
        else:
            producer.submit(PAYLOAD)
        latencies.append(now() - t)
        lags.append(t - at)
        if now() > start + 3 * seconds:
            break
    lags.sort()
    return {"offered_rate": rate, "requests": len(latencies), "planned": total, "seconds": now() - start,
            "achieved_rate": len(latencies) / (now() - start), **latency_summary(latencies),
            "send_lag_p99_ms": percentile(lags, 99) * 1000, "send_lag_max_ms": lags[-1] * 1000}


# ------------------------------------------------------------ orchestration (the bench process)


def start_workers(system: str, port: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_REDIS_PORT": str(port)}
    mod = importlib.import_module(SYSTEMS[system])
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for cmd in mod.worker_commands(port, concurrency)]


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def drain_figure(system: str, server: Redis, tasks: int, max_seconds: float = 90.0) -> dict[str, Any]:
    """d: prefill, start the worker CLI with 10-way concurrency, and time the completions from the first
    one to the last (worker start-up is not counted)."""
    db = server.client()
    measured(None, (lib_prefill, {"system": system, "port": server.port, "count": tasks}))
    workers = start_workers(system, server.port, 10)
    try:
        deadline = time.monotonic() + max_seconds
        while int(db.get(DONE_KEY) or 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        t0, c0 = now(), int(db.get(DONE_KEY) or 0)
        done = c0
        while done < tasks and time.monotonic() < deadline:
            time.sleep(0.01)
            done = int(db.get(DONE_KEY) or 0)
        t1 = now()
    finally:
        stop_workers(workers)
    out = {"completed": done - c0, "seconds": t1 - t0, "rate": (done - c0) / max(t1 - t0, 1e-9)}
    if done < tasks:
        out["error"] = f"only {done:,} of {tasks:,} done in {max_seconds:.0f} s"
    return out


def waiting_figure(system: str, server: Redis, rate: float, seconds: float) -> dict[str, Any]:
    """e: the same worker set-up as d (10-way concurrency) waiting for work, so the figure is delivery
    latency rather than one worker's throughput; each task pushes the time since its scheduled submit."""
    db = server.client()
    workers = start_workers(system, server.port, 10)
    try:
        lib_prefill_wait(system, server, db)
        producer = measured(server, (lib_paced, {"system": system, "port": server.port, "rate": rate,
                                                 "seconds": seconds, "stamped": True}))[0]
        deadline = time.monotonic() + 30
        while db.llen(LAT_KEY) < producer["requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        latencies = [float(v) for v in db.lrange(LAT_KEY, 0, -1)]
    finally:
        stop_workers(workers)
    return {"tasks": len(latencies), **latency_summary(latencies), "offered_rate": rate,
            "submit_p99_ms": producer["p99_ms"], "achieved_rate": producer["achieved_rate"]}


def lib_prefill_wait(system: str, server: Redis, db: Any) -> None:
    """Waits until the worker is up and idle: one task submitted and done."""
    measured(None, (lib_prefill, {"system": system, "port": server.port, "count": 1}))
    deadline = time.monotonic() + 60
    while int(db.get(DONE_KEY) or 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system} worker did not run a task within 60 s")
        time.sleep(0.02)
    time.sleep(0.5)


def run_system(system: str, mode: Mode) -> dict[str, dict[str, Any]]:
    why = available(system)
    if why:
        return {"_about": {"text": f"skipped: {why}"}}
    mod = importlib.import_module(SYSTEMS[system])
    res: dict[str, dict[str, Any]] = {"_about": {"text": mod.ABOUT}}
    secs = mode.seconds
    with Redis() as server:
        log(f"{system} a/c")
        res["a"] = measured(server, (lib_closed_loop, {"system": system, "port": server.port, "seconds": secs}))[0]
        res["b"] = {"skipped": "no pipelined single submit"}
        if getattr(mod.Producer, "submit_many", None) is not None:
            res["c"] = measured(server, (lib_batches, {"system": system, "port": server.port, "seconds": secs,
                                                       "size": 1000}))[0]
        else:
            res["c"] = {"skipped": "no batch submit"}
    with Redis() as server:
        log(f"{system} d: {DRAIN_TASKS[mode.name]:,} tasks, worker with 10-way concurrency")
        res["d"] = drain_figure(system, server, DRAIN_TASKS[mode.name])
    with Redis() as server:
        log(f"{system} e/f")
        res["e"] = waiting_figure(system, server, E_RATE, secs)
        res["f"] = measured(server, (lib_paced, {"system": system, "port": server.port, "rate": F_RATE,
                                                 "seconds": secs}))[0]
    with Redis() as server:
        log(f"{system} g")
        time.sleep(0.3)
        idle = server.rss_bytes()
        measured(None, (lib_prefill, {"system": system, "port": server.port, "count": G_TASKS}))
        time.sleep(1.0)
        rss = server.rss_bytes()
        res["g"] = {"rss_mb": rss / MB, "idle_mb": idle / MB, "delta_mb": (rss - idle) / MB, "pending": G_TASKS}
    if mode.full:
        res["h"] = restart_figure(system) if mod.RESTART_FIGURE else {"skipped": "see redis+rq (same AOF replay)"}
    return res


def restart_figure(system: str) -> dict[str, Any]:
    """h: Redis holding H_TASKS jobs, kill -9 after an fsync second, restart until PING answers (AOF loaded)."""
    with Redis() as server:
        log(f"{system} h: {H_TASKS:,} tasks")
        measured(None, (lib_prefill, {"system": system, "port": server.port, "count": H_TASKS}))
        out: dict[str, Any] = {"tasks": H_TASKS, "rss_mb": server.rss_bytes() / MB}
        time.sleep(1.5)  # appendfsync everysec: what a kill -9 keeps is at most a second old
        server.kill()
        start = time.monotonic()
        server.start()
        out["restart_s"] = out["kill9_restart_s"] = time.monotonic() - start
        log(f"{system} h: restart after kill -9: {out['restart_s']:.1f} s")
    return out


def run_redis_peers(mode: Mode) -> dict[str, dict[str, dict[str, Any]]]:
    return {f"redis+{system}": run_system(system, mode) for system in SYSTEMS}
