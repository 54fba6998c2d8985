"""The benchmark: `python -m loadtest.bench [--quick] [--full] [--peers]`.

Starts its own servers (the broker on a temp data dir with default settings, a bare gevent echo server
with the same framing as the physical ceiling, and with --peers beanstalkd and Redis), drives them from
separate load processes, and prints the figures a-h next to their goals, then i (the REST API, from
`loadtest.rest_bench`). Results go to bench-results/<timestamp>.json and, when matplotlib is
importable, a PNG bar chart beside it.

    --quick   about a minute: 2-s figures, 40,000 tasks for d
    (default) 5-s figures, 150,000 tasks for d
    --full    10-s figures, 300,000 tasks for d, and h (restart with 1,000,000 live tasks)
    --peers   the same figures against beanstalkd and Redis (RQ, Dramatiq, Celery); see loadtest/peers.py
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from loadtest import bench_report as report
from loadtest.bench_procs import ROOT
from loadtest.bench_tq import MODES, run_echo, run_tqbroker

METHOD = """\
Method: every server is its own subprocess; every load is its own spawned process (client and server never
share a process). Figures a, b, e and f use loadtest/rawclient.py: one blocking socket per connection, frames
from transport.frames, no reader thread, so they measure the broker, not the Python client's threads (the
"Python client" row shows what that client adds). c and d use the same raw client; d runs 10 worker
connections in 2 processes (claim up to 10, then all RESULTs and the next CLAIM in one write) on prefilled
tasks. e and f are open-loop: requests leave on a fixed schedule whatever the replies do, latency counts from
each request's actual write (the sender's own lag against the schedule is in the JSON, not charged to the
server); the echo column of f is the same load against the echo server, i.e. what this machine's scheduling
alone costs. Broker: default settings (fsync: interval, 100 ms) on a fresh temp data dir per group of
figures; broker.queue_depth_threshold raised to 100,000,000 for a-f, which submit far more than its default
100,000 with no worker; g runs on pure defaults. "CPU% srv/load/other": CPU used during the figure by the
server, by the load processes, and by anything else on the machine (100 = one core; this machine has 2)."""


def machine_summary() -> str:
    load1, load5, _ = os.getloadavg()
    return (f"{platform.node()}: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, load average {load1:.2f} / {load5:.2f} (1 / 5 min)")


def busy_before(seconds: float = 1.0) -> float:
    """Percent of one core the machine was busy with before the benchmark started anything."""
    return psutil.cpu_percent(interval=seconds) * psutil.cpu_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="finish in about a minute")
    size.add_argument("--full", action="store_true", help="longer figures, plus h (restart with 1,000,000 tasks)")
    parser.add_argument("--peers", action="store_true", help="also run the figures against beanstalkd and Redis")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the machine to be idle (under 25%% of one core busy)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="where results are written")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full" if args.full else "default"]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so every server is stopped and removed
    started = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    idle_busy = busy_before()
    deadline = time.monotonic() + args.wait_quiet
    while idle_busy > 25 and time.monotonic() < deadline:
        idle_busy = busy_before(2.0)
    print(f"tqbroker benchmark ({mode.name}), {machine_summary()}")
    print(f"machine busy before start: {idle_busy:.0f}% of one core (other work on this machine skews every figure)")
    echo = run_echo(mode)
    tq = run_tqbroker(mode)
    from loadtest import rest_bench

    rest = rest_bench.run_rest(min(mode.seconds, 5.0))  # figure i: the REST API (no peer here has one to compare)
    systems: dict[str, dict[str, Any]] = {"tqbroker": tq}
    if args.peers:
        from loadtest.peers import run_peers

        systems.update(run_peers(mode, tq))
    elapsed = time.monotonic() - started

    print()
    print(report.goals_table(tq, echo))
    errors = {k: v["error"] for k, v in tq.items() if v.get("error")}
    if errors:
        print(f"errors: {errors}")
    print()
    print(rest_bench.report(rest))
    if args.peers:
        print()
        print(report.peers_table(systems))
    print()
    print(METHOD)
    path, png = report.save(args.out, stamp, {
        "mode": mode.name, "machine": machine_summary(), "busy_before_pct": idle_busy, "elapsed_s": elapsed,
        "argv": sys.argv[1:], "echo": echo, "systems": systems, "rest": rest,
    })
    print(f"\nresults: {path}" + (f", chart: {png}" if png else "") + f"  ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
