"""The benchmark's figures a-h for tqbroker, and a/b for the bare echo server (the physical ceiling).

Each group of figures gets a fresh broker subprocess on a fresh temp data dir, so one figure's leftover
tasks do not weigh on the next. Settings are the defaults (fsync: interval, every 100 ms) except
`broker.queue_depth_threshold`, raised where a figure submits more than its default 100,000 (b and c
submit hundreds of thousands of tasks with no worker); g runs on pure defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from loadtest import bench_load as load
from loadtest.bench_procs import HOST, Broker, EchoServer, Server, measured, run_load
from loadtest.rawclient import RawClient
from transport import messages as m

MB = 1_000_000
BIG_QUEUE = {"TQ_BROKER__QUEUE_DEPTH_THRESHOLD": "100000000"}
DRAIN_PROCESSES = 2  # d's 10 worker connections, spread over 2 load processes of 5
E_RATE = 1000
F_RATE = 5000
G_TASKS = 100_000
H_TASKS = 1_000_000


@dataclass(frozen=True)
class Mode:
    name: str
    seconds: float  # length of each timed figure
    drain_tasks: int  # tasks prefilled for d
    full: bool  # run h (restart with 1,000,000 live tasks)


MODES = {
    "quick": Mode("quick", 2.0, 40_000, False),
    "default": Mode("default", 5.0, 150_000, False),
    "full": Mode("full", 10.0, 300_000, True),
}


def log(text: str) -> None:
    print(f"  .. {text}", flush=True)


def prefill(port: int, tasks: int, batch: int = 1000) -> None:
    run_load(load.batches, host=HOST, port=port, size=batch, count=max(1, tasks // batch))


def figure(server: Server, fn: Any, **kwargs: Any) -> dict[str, Any]:
    return measured(server, (fn, {"host": HOST, "port": server.port, **kwargs}))[0]


def drain_figure(server: Server, connections: int = 10, max_seconds: float = 120.0) -> dict[str, Any]:
    per = connections // DRAIN_PROCESSES
    parts = measured(server, *[(load.drain, {"host": HOST, "port": server.port, "connections": per,
                                             "worker_prefix": f"w{i}", "max_seconds": max_seconds})
                               for i in range(DRAIN_PROCESSES)])
    completed = sum(p["completed"] for p in parts)
    seconds = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    cpu = {k: v for k, v in parts[0].items() if k.endswith("_cpu_pct")}
    return {"completed": completed, "seconds": seconds, "rate": completed / seconds, "connections": connections,
            "errors": sum(p["errors"] for p in parts), "error": next((p["error"] for p in parts if p["error"]), ""),
            **cpu}


def waiting_figure(server: Server, rate: float, seconds: float) -> dict[str, Any]:
    expected = int(rate * seconds)
    worker, producer = measured(
        server,
        (load.waiting_worker, {"host": HOST, "port": server.port, "expected": expected, "max_seconds": seconds + 30}),
        (load.paced_submit, {"host": HOST, "port": server.port, "rate": rate, "seconds": seconds, "stamped": True}),
        ready_first=True,
    )
    return {**worker, "offered_rate": rate, "achieved_rate": producer["achieved_rate"],
            "submit_p99_ms": producer["p99_ms"], "send_lag_p99_ms": producer["send_lag_p99_ms"]}


def stats(port: int) -> m.StatsInfo:
    with RawClient(HOST, port) as client:
        reply = client.call(m.Stats(id=1))
    return reply.stats  # type: ignore[attr-defined]


def rss_figure(tasks: int = G_TASKS) -> dict[str, Any]:
    """g: RSS of a broker on pure defaults, idle and then holding `tasks` pending 100-byte tasks."""
    with Broker() as broker:
        time.sleep(0.5)
        idle = broker.rss_bytes()
        prefill(broker.port, tasks)
        pending = stats(broker.port).pending
        time.sleep(1.0)
        main, children = broker.rss_parts()
    rss = main + children
    return {"rss_mb": rss / MB, "idle_mb": idle / MB, "delta_mb": (rss - idle) / MB, "pending": pending,
            "bytes_per_task": (rss - idle) / max(pending, 1), "broker_process_mb": main / MB,
            "database_process_mb": children / MB}


def restart_figure(tasks: int = H_TASKS) -> dict[str, Any]:
    """h: time from starting the broker process to answering STATS with every task back, after kill -9
    (recovery replays the WAL) and after a clean SIGTERM stop (which writes a snapshot)."""
    out: dict[str, Any] = {"tasks": tasks}
    with Broker(**BIG_QUEUE) as broker:
        log(f"h: submitting {tasks:,} tasks")
        prefill(broker.port, tasks, batch=10_000)
        out["rss_mb"] = broker.rss_bytes() / MB
        for how in ("kill9", "sigterm"):
            if how == "kill9":
                broker.kill()
            else:
                out["sigterm_stop_s"], out["sigterm_exited"] = broker.terminate(timeout=60)
                if not out["sigterm_exited"]:
                    log("h: the broker did not exit within 60 s of SIGTERM and was killed")
            start = time.monotonic()
            broker.start()
            pending = stats(broker.port).pending
            out[f"{how}_restart_s"] = time.monotonic() - start
            out[f"{how}_pending"] = pending
            log(f"h: restart after {how}: {out[f'{how}_restart_s']:.1f} s, {pending:,} pending")
    out["restart_s"] = out["kill9_restart_s"]
    return out


def run_tqbroker(mode: Mode) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {}
    secs = mode.seconds
    with Broker(**BIG_QUEUE) as broker:
        log("tqbroker a/b/c")
        res["a"] = figure(broker, load.closed_loop, seconds=secs)
        res["a_py"] = figure(broker, load.python_client_closed_loop, seconds=secs)
        res["b"] = figure(broker, load.pipelined, seconds=secs, depth=100)
        res["c"] = figure(broker, load.batches, seconds=secs, size=1000)
    with Broker(**BIG_QUEUE) as broker:
        log(f"tqbroker d: prefilling {mode.drain_tasks:,} tasks, then 10 worker connections drain them")
        prefill(broker.port, mode.drain_tasks)
        res["d"] = drain_figure(broker)
    with Broker(**BIG_QUEUE) as broker:
        log("tqbroker e/f")
        res["e"] = waiting_figure(broker, E_RATE, secs)
        res["f"] = figure(broker, load.paced_submit, rate=F_RATE, seconds=secs)
    log("tqbroker g")
    res["g"] = rss_figure()
    if mode.full:
        res["h"] = restart_figure()
    return res


def run_echo(mode: Mode) -> dict[str, dict[str, Any]]:
    with EchoServer() as echo:
        log("echo ceiling a/b/f")
        return {
            "a": figure(echo, load.closed_loop, seconds=mode.seconds),
            "b": figure(echo, load.pipelined, seconds=mode.seconds, depth=100),
            "f": figure(echo, load.paced_submit, rate=F_RATE, seconds=mode.seconds),
        }
