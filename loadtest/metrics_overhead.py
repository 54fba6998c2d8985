"""What do the Prometheus metrics cost? Submit throughput with the real metrics vs with a no-op object.

    python -m loadtest.metrics_overhead [--mode broker|actor|both] [--rounds 3] [--seconds 5]

Two measurements, because each answers a different question:

* `broker` (end to end, the figure the 5 % budget is about): two real brokers, one started with the
  real `BrokerMetrics`, one with `NoopMetrics` swapped in before `BrokerSystem` builds it (the swap is the
  only difference: same code path, same settings, a fresh data dir each run). Client threads pipeline
  SUBMITs over TCP for `--seconds`; the metrics broker is also scraped every `--scrape-interval`
  (default 1 s, fifteen times Prometheus' default rate, so the figure is pessimistic). Runs alternate
  metrics/no-op (A B, B A, ...) so drift in the machine's load hits both; the medians are compared.
  This is what an operator sees, but it carries the noise of two processes and the network stack.

* `actor` (in-process, the upper bound): the queue actor alone, with a real WAL in a temp dir, fed
  SUBMIT batches the way a connection feeds it (one `QueueRequests` per recv, 100 requests each). Every
  per-submit metric update happens in this actor, so removing the sockets and decoding leaves the
  metrics' share at its largest; the end-to-end overhead can only be smaller.

* `instructions` (deterministic; needs valgrind): the `broker` comparison counted in CPU instructions
  instead of seconds. Each broker runs under callgrind; after a warm-up the counters are dumped, N
  pipelined SUBMITs are driven, and dumped again, so the second dump is exactly the broker's work for N
  submits (all threads). Slow (minutes), but immune to the machine's load: on a shared two-core box the
  wall-clock figures above swing by +-20 % from run to run, which hides a 5 % effect.

Wall clock is printed, but the verdict uses the broker's CPU per submit (user + system seconds of the
broker process, or instructions), paired per round: a saturated broker's throughput is 1 / (CPU per
submit), and CPU time is far less disturbed by other load than elapsed time.
Prints both rates and the ratio for each mode; exit status 1 if an overhead is above `--budget` (5 %).
`python -m loadtest.metrics_overhead serve [--noop]` is the broker side of `broker` mode (internal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class _Noop:
    """Absorbs any attribute access and any call: `m.tasks_total.labels("q").inc()` does nothing."""

    def __getattr__(self, name: str) -> _Noop:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Noop:
        return self


class NoopMetrics(_Noop):
    """Stands in for `actors.metrics.BrokerMetrics` with every update a no-op (no registry, no locks)."""


# ------------------------------------------------------------------ broker side (`serve`)


def serve(noop: bool) -> int:
    """Runs the broker exactly as `python -m actors`, with NoopMetrics swapped in if asked."""
    from gevent import monkey

    monkey.patch_all()
    import actors.system
    from actors.main import main

    if noop:
        actors.system.BrokerMetrics = NoopMetrics  # type: ignore[assignment,misc]
    return main([])


# ------------------------------------------------------------------ broker mode (end to end)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_broker(noop: bool, data_dir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics_port = _free_port(), (0 if noop else _free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({
        "PYTHONPATH": str(ROOT), "TQ_BROKER__HOST": "127.0.0.1", "TQ_BROKER__PORT": str(port),
        "TQ_PERSISTENCE__DATA_DIR": str(data_dir), "TQ_MONITORING__PROMETHEUS_PORT": str(metrics_port),
        "TQ_MONITORING__PROMETHEUS_HOST": "127.0.0.1", "TQ_MONITORING__LOG_LEVEL": "warning",
        "TQ_BROKER__QUEUE_DEPTH_THRESHOLD": "100000000", "TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "3600",
    })
    args = [sys.executable, "-m", "loadtest.metrics_overhead", "serve"] + (["--noop"] if noop else [])
    log = open(data_dir.parent / f"broker-{'noop' if noop else 'metrics'}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    from transport.client import Client

    deadline = time.monotonic() + 30
    while True:
        try:
            Client("127.0.0.1", port, timeout=2).close()
            return proc, port, metrics_port
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"broker did not start (see {log.name})") from None
            time.sleep(0.05)


def _drive(port: int, seconds: float, clients: int, window: int, metrics_port: int,
           scrape_interval: float, broker_pid: int) -> tuple[float, float, int]:
    """(submits/s, broker CPU seconds per submit, scrapes) over `seconds` from `clients` threads, each
    pipelining `window` SUBMITs at a time."""
    import psutil

    from transport.client import Client
    from transport.messages import Submit, TaskSpec

    stop = threading.Event()
    counts = [0] * clients
    scrapes = [0]
    spec = TaskSpec(kind="overhead", payload=b"x" * 64, queue="overhead")
    batch = [Submit(id=0, task=spec)] * window
    conns = [Client("127.0.0.1", port, timeout=30) for _ in range(clients)]

    def submitter(i: int) -> None:
        c = conns[i]
        while not stop.is_set():
            c.pipeline(batch)
            counts[i] += window

    def scraper() -> None:
        while not stop.wait(scrape_interval):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                r.read()
            scrapes[0] += 1

    threads = [threading.Thread(target=submitter, args=(i,), daemon=True) for i in range(clients)]
    if metrics_port:
        threads.append(threading.Thread(target=scraper, daemon=True))
    for c in conns:  # warm-up: first requests pay for imports and allocations
        c.pipeline(batch)
    broker = psutil.Process(broker_pid)
    cpu_before = sum(broker.cpu_times()[:2])
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - started
    cpu = sum(broker.cpu_times()[:2]) - cpu_before
    done = sum(counts)
    for c in conns:
        c.close()
    return done / elapsed, cpu / done, scrapes[0]


# rate with metrics, rate no-op, CPU/submit with, CPU/submit no-op, paired rate ratio, paired CPU ratio
Figures = tuple[float, float, float, float, float, float]


def broker_mode(args: argparse.Namespace) -> Figures:
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="tq-overhead-") as tmp:
        for r in range(args.rounds):
            for noop in ((False, True) if r % 2 == 0 else (True, False)):
                data_dir = Path(tmp) / f"r{r}-{'noop' if noop else 'metrics'}" / "data"
                data_dir.parent.mkdir(parents=True)
                proc, port, metrics_port = _start_broker(noop, data_dir)
                try:
                    rate, cpu, scrapes = _drive(port, args.seconds, args.clients, args.window, metrics_port,
                                                args.scrape_interval, proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                rates[noop].append(rate)
                cpus[noop].append(cpu)
                what = "no-op metrics" if noop else f"metrics ({scrapes} scrapes)"
                print(f"  broker round {r + 1}: {what:<26} {rate:>10,.0f} submits/s, "
                      f"broker CPU {cpu * 1e6:6.2f} us/submit", flush=True)
    return _medians(rates, cpus)


def _medians(rates: dict[bool, list[float]], cpus: dict[bool, list[float]]) -> Figures:
    """Medians of each side, and the median of the per-round ratios (paired runs share the machine's
    load of that moment, so their ratio is steadier than the ratio of medians)."""
    return (statistics.median(rates[False]), statistics.median(rates[True]), statistics.median(cpus[False]),
            statistics.median(cpus[True]),
            statistics.median(m / n for m, n in zip(rates[False], rates[True], strict=True)),
            statistics.median(n / m for m, n in zip(cpus[False], cpus[True], strict=True)))


# ------------------------------------------------------------------ instructions mode (callgrind)


def instructions_mode(args: argparse.Namespace) -> Figures:
    import glob
    import shutil

    from transport.client import Client
    from transport.messages import Submit, TaskSpec

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("instructions mode needs valgrind (callgrind_control) on PATH")
    spec = TaskSpec(kind="overhead", payload=b"x" * 64, queue="overhead")
    batch = [Submit(id=0, task=spec)] * args.window
    n = max(args.instruction_submits // args.window, 1) * args.window

    def dump(pid: int, out_dir: str) -> int:
        before = set(glob.glob(f"{out_dir}/cg.{pid}*"))
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=900)
        total = 0
        for path in sorted(set(glob.glob(f"{out_dir}/cg.{pid}*")) - before):
            with open(path) as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(("totals:", "summary:")))
        return total

    def one_run(noop: bool, tmp: Path) -> tuple[float, float]:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
        env.update({
            "PYTHONPATH": str(ROOT), "TQ_BROKER__HOST": "127.0.0.1", "TQ_BROKER__PORT": str(port),
            "TQ_PERSISTENCE__DATA_DIR": str(tmp / "data"), "TQ_MONITORING__PROMETHEUS_PORT": "0",
            "TQ_MONITORING__LOG_LEVEL": "warning", "TQ_BROKER__QUEUE_DEPTH_THRESHOLD": "100000000",
            "TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "3600",
        })
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.%p", sys.executable, "-m",
               "loadtest.metrics_overhead", "serve"] + (["--noop"] if noop else [])
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    client = Client("127.0.0.1", port, timeout=600)
                    break
                except Exception:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("broker under valgrind did not start") from None
                    time.sleep(0.5)
            client.pipeline(batch)  # warm-up
            dump(proc.pid, str(tmp))
            started = time.monotonic()
            for _ in range(n // args.window):
                client.pipeline(batch, timeout=600)
            elapsed = time.monotonic() - started
            instructions = dump(proc.pid, str(tmp))
            client.close()
        finally:
            proc.kill()  # no graceful stop: its final snapshot is not what is measured
            proc.wait()
        return n / elapsed, instructions / n

    rates: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for noop in ((False, True) if r % 2 == 0 else (True, False)):
            with tempfile.TemporaryDirectory(prefix="tq-overhead-cg-") as tmp:
                rate, per_submit = one_run(noop, Path(tmp))
            rates[noop].append(rate)
            cpus[noop].append(per_submit / 1e9)  # reported as "us" below: thousands of instructions
            print(f"  instructions round {r + 1}: {'no-op metrics' if noop else 'metrics':<14} "
                  f"{per_submit:>9,.0f} instructions/submit (under valgrind: {rate:,.0f} submits/s)", flush=True)
    return _medians(rates, cpus)


# ------------------------------------------------------------------ actor mode (in-process)


def actor_mode(args: argparse.Namespace) -> Figures:
    from gevent import monkey

    monkey.patch_all()
    import gevent.event

    from actors.envelopes import QueueRequests
    from actors.metrics import BrokerMetrics
    from actors.queue import QueueActor
    from config.settings import load_settings
    from storage.wal import WriteAheadLog
    from transport.messages import Submit, TaskSpec

    settings = load_settings(env={}, overrides={"broker.queue_depth_threshold": 100_000_000})
    spec = TaskSpec(kind="overhead", payload=b"x" * 64, queue="overhead")
    batch_size = 100

    class Sink:
        actor_urn = "urn:overhead-sink"

        def __init__(self, expected: int) -> None:
            self.expected = expected
            self.got = 0
            self.done = gevent.event.Event()

        def tell(self, replies: Any) -> None:
            self.got += len(replies.messages)
            if self.got >= self.expected:
                self.done.set()

    def one_run(noop: bool, directory: Path) -> tuple[float, float]:
        metrics: Any = NoopMetrics() if noop else BrokerMetrics()
        wal = WriteAheadLog(directory / "wal", fsync="interval", sync_interval_ms=100)
        wal.open()
        wal.on_fsync = metrics.wal_fsync.observe
        actor = QueueActor.start(settings, wal=wal, metrics=metrics)
        n = args.actor_submits
        sink = Sink(n)
        requests = [Submit(id=i, task=spec) for i in range(batch_size)]
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(n // batch_size):
            actor.tell(QueueRequests(requests, sink))
        sink.done.wait(timeout=300)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        actor.stop()
        wal.close()
        return sink.got / elapsed, cpu / sink.got

    rates: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="tq-overhead-actor-") as tmp:
        (Path(tmp) / "warmup").mkdir()
        one_run(False, Path(tmp) / "warmup")
        for r in range(args.rounds * 2):
            for noop in ((False, True) if r % 2 == 0 else (True, False)):
                d = Path(tmp) / f"r{r}-{noop}"
                d.mkdir()
                rate, cpu = one_run(noop, d)
                rates[noop].append(rate)
                cpus[noop].append(cpu)
                print(f"  actor round {r + 1}: {'no-op metrics' if noop else 'metrics':<14} {rate:>10,.0f} submits/s, "
                      f"CPU {cpu * 1e6:6.2f} us/submit", flush=True)
    return _medians(rates, cpus)


# ------------------------------------------------------------------ main


def report(mode: str, figures: Figures, budget: float, unit: str = "us") -> bool:
    """Prints both rates and both ratios; the verdict is on CPU per submit (see the module docstring)."""
    with_metrics, without, cpu_with, cpu_without, rate_ratio, cpu_ratio = figures  # cpu_ratio = no-op / with:
    # the throughput ratio a CPU-bound broker shows
    ok = 1 - cpu_ratio <= budget
    print(f"{mode}:\n"
          f"  throughput  with metrics {with_metrics:>9,.0f} submits/s, no-op {without:>9,.0f} submits/s, "
          f"paired ratio {rate_ratio:.3f} (wall clock; noisy on a shared machine)\n"
          f"  broker CPU  with metrics {cpu_with * 1e6:>9.2f} {unit}/submit,  no-op {cpu_without * 1e6:>9.2f} "
          f"{unit}/submit, "
          f"paired ratio {cpu_ratio:.3f}\n"
          f"  overhead {(1 - cpu_ratio) * 100:+.1f} % of submit throughput (budget {budget * 100:.0f} %): "
          f"{'OK' if ok else 'OVER'}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve("--noop" in argv[1:])
    p = argparse.ArgumentParser(prog="python -m loadtest.metrics_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["broker", "actor", "both", "instructions"], default="both")
    p.add_argument("--rounds", type=int, default=3, help="alternating metrics/no-op pairs per mode")
    p.add_argument("--seconds", type=float, default=5.0, help="length of one broker-mode run")
    p.add_argument("--clients", type=int, default=4, help="submitting connections in broker mode")
    p.add_argument("--window", type=int, default=200, help="SUBMITs pipelined per round trip")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between /metrics scrapes")
    p.add_argument("--actor-submits", type=int, default=200_000, help="SUBMITs per actor-mode run")
    p.add_argument("--instruction-submits", type=int, default=30_000, help="SUBMITs per instructions-mode run")
    p.add_argument("--budget", type=float, default=0.05, help="largest acceptable overhead (fraction)")
    args = p.parse_args(argv)
    ok = True
    if args.mode in ("broker", "both"):
        ok &= report("broker (end to end)", broker_mode(args), args.budget)
    if args.mode == "instructions":
        ok &= report("broker under callgrind (instructions, deterministic)", instructions_mode(args), args.budget,
                     unit="k instr")
    if args.mode == "actor":
        ok &= report("actor (in-process upper bound)", actor_mode(args), args.budget)
    elif args.mode == "both":  # actor mode patches the process with gevent: give it a fresh one
        child = ["--mode", "actor", "--rounds", str(args.rounds), "--actor-submits", str(args.actor_submits),
                 "--budget", str(args.budget)]
        ok &= subprocess.run([sys.executable, "-m", "loadtest.metrics_overhead", *child], cwd=ROOT).returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
