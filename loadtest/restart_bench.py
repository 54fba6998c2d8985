"""Restart bench: how long the broker takes to come back with N live tasks, and how much memory it holds.

    python -m loadtest.restart_bench                  # 1,000,000 tasks, SIGTERM (graceful: final snapshot)
    python -m loadtest.restart_bench --kill           # SIGKILL: recovery replays the WAL after the last snapshot
    python -m loadtest.restart_bench --tasks 200000
    python -m loadtest.restart_bench --snapshot-gap --set TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS=5
    python -m loadtest.restart_bench --tasks 130 --payload-bytes 16773120 --batch 1 --in-flight 2 \
        --set TQ_BROKER__MAX_PENDING_BYTES=4294967296     # a 2 GiB snapshot: watch the peak RSS lines

It starts a broker on a temp data dir, submits N pending tasks with pipelined SUBMIT_BATCHes, stops it
(SIGTERM, or SIGKILL with --kill), starts it again on the same data dir and port, and reports:
- listening: the port accepts TCP connections (the broker binds it before recovering, so this is early);
- answering: the first STATS is answered (recovery done, requests served);
- recovered: STATS shows all N tasks pending (the figure asked for);
plus the broker's own recovery log line and its resident memory (VmRSS) before the stop and after the
restart, and the peak resident memory (VmHWM) of the broker and of its database process since the
restart (the snapshot load). With --snapshot-gap, before stopping it sends STATS one at a time until the
broker logs a timer snapshot of all N tasks and reports the slowest answer: the hub's longest silence
during the snapshot, as a client sees it. Default settings apart from the queue depth threshold (raised
above N) and the data dir.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from loadtest.crash_harness import Broker, _parse_settings
from transport import messages as m
from transport.client import Client
from transport.errors import ClientError

QUEUE = "restart-bench"


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:,.0f} MiB"


def submit_all(port: int, tasks: int, batch: int, payload: bytes, in_flight: int) -> float:
    """Submits `tasks` pending tasks with `in_flight` SUBMIT_BATCHes outstanding; returns the seconds taken."""
    started = time.monotonic()
    with Client("127.0.0.1", port, timeout=300.0, client_name="restart-bench") as client:
        pending = []
        sent = 0
        while sent < tasks:
            size = min(batch, tasks - sent)
            specs = [m.TaskSpec(kind="bench.restart", payload=payload, queue=QUEUE) for _ in range(size)]
            pending.append(client.send_async(m.SubmitBatch(id=0, tasks=specs)))
            sent += size
            if len(pending) >= in_flight:
                pending.pop(0).get()
        for slot in pending:
            slot.get()
        stats = client.stats()
    if stats.pending != tasks:
        raise SystemExit(f"after submitting, STATS shows {stats.pending} pending, not {tasks}")
    return time.monotonic() - started


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_rss(broker: Broker) -> str:
    """VmHWM of the broker and of each child (its database process), in MiB."""
    assert broker.proc is not None
    pid = broker.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    parts = [f"broker {_status_kib(pid, 'VmHWM') / 1024:,.0f} MiB"]
    parts += [f"database process {_status_kib(int(c), 'VmHWM') / 1024:,.0f} MiB" for c in children]
    return ", ".join(parts)


def snapshot_gap(broker: Broker, port: int, tasks: int, timeout: float) -> None:
    """STATS one at a time until the log shows a snapshot of `tasks` live tasks taken after this started;
    prints the slowest round trip (the longest the broker left a request unanswered meanwhile)."""
    marker = f"snapshot of {tasks} live tasks"
    seen = broker.log_path.read_text(errors="replace").count(marker)
    deadline = time.monotonic() + timeout
    times: list[float] = []
    with Client("127.0.0.1", port, timeout=timeout) as client:
        while broker.log_path.read_text(errors="replace").count(marker) <= seen:
            for _ in range(200):
                before = time.perf_counter()
                client.stats()
                times.append(time.perf_counter() - before)
            _check_alive(broker, deadline)
    times.sort()
    print(f"during a snapshot of {tasks:,} live tasks: {len(times):,} STATS one at a time, slowest "
          f"{times[-1] * 1000:.1f} ms, p99.9 {times[int(len(times) * 0.999)] * 1000:.2f} ms, "
          f"median {times[len(times) // 2] * 1000:.2f} ms")
    line = [x for x in broker.log_path.read_text(errors="replace").splitlines() if marker in x][-1]
    print(f"broker log: {line.strip()[-160:]}")


def wait_listening(port: int, broker: Broker, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            _check_alive(broker, deadline)
            time.sleep(0.005)  # polling for the listener


def wait_recovered(port: int, broker: Broker, tasks: int, deadline: float) -> tuple[float, float]:
    """Seconds (monotonic clock) when STATS was first answered, and when it showed all `tasks` pending."""
    answered = 0.0
    while True:
        try:
            with Client("127.0.0.1", port, timeout=max(deadline - time.monotonic(), 1.0)) as client:
                while True:
                    stats = client.stats()
                    answered = answered or time.monotonic()
                    if stats.pending >= tasks:
                        return answered, time.monotonic()
                    _check_alive(broker, deadline)
                    time.sleep(0.01)  # polling STATS
        except ClientError:
            _check_alive(broker, deadline)
            time.sleep(0.01)  # not answering yet


def _check_alive(broker: Broker, deadline: float) -> None:
    assert broker.proc is not None
    if broker.proc.poll() is not None:
        raise SystemExit(f"broker exited with {broker.proc.returncode}; see {broker.log_path}")
    if time.monotonic() > deadline:
        raise SystemExit(f"broker did not recover in time; see {broker.log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.restart_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000, help="live tasks to restart with (default 1,000,000)")
    parser.add_argument("--kill", action="store_true", help="stop with SIGKILL instead of SIGTERM")
    parser.add_argument("--batch", type=int, default=10_000, help="tasks per SUBMIT_BATCH (max 10,000)")
    parser.add_argument("--in-flight", type=int, default=4, help="SUBMIT_BATCHes outstanding at once")
    parser.add_argument("--payload-bytes", type=int, default=100, help="payload size of each task")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on the restart after this (s)")
    parser.add_argument("--set", action="append", default=[], metavar="TQ_SECTION__KEY=VALUE",
                        help="extra broker setting, e.g. TQ_PERSISTENCE__FSYNC=always")
    parser.add_argument("--snapshot-gap", action="store_true",
                        help="before stopping, measure the slowest STATS during a timer snapshot of all tasks")
    parser.add_argument("--data-dir", help="use (and keep) this data dir instead of a temporary one")
    args = parser.parse_args(argv)

    temp = None if args.data_dir else tempfile.mkdtemp(prefix="tq-restart-")
    data_dir = Path(args.data_dir) if args.data_dir else Path(temp) / "data"  # type: ignore[arg-type]
    settings = {"TQ_BROKER__QUEUE_DEPTH_THRESHOLD": str(args.tasks + 1), **_parse_settings(args.set)}
    broker = Broker(data_dir, settings)
    how = "SIGKILL" if args.kill else "SIGTERM"
    print(f"restart bench: {args.tasks:,} tasks of {args.payload_bytes} B, stop with {how}, data dir {data_dir}")
    try:
        broker.start()
        seconds = submit_all(broker.port, args.tasks, args.batch, b"x" * args.payload_bytes, args.in_flight)
        print(f"submitted {args.tasks:,} tasks in {seconds:.1f} s ({args.tasks / seconds:,.0f}/s); "
              f"broker RSS {_mib(broker.rss_bytes())}")
        if args.snapshot_gap:
            snapshot_gap(broker, broker.port, args.tasks, args.timeout)
        stop_started = time.monotonic()
        if args.kill:
            broker.kill()
        else:
            status = broker.terminate(timeout=args.timeout)
            if status != 0:
                print(f"warning: SIGTERM exit status {status}")
        print(f"stopped with {how} in {time.monotonic() - stop_started:.1f} s")

        started = time.monotonic()
        deadline = started + args.timeout
        broker.spawn()
        wait_listening(broker.port, broker, deadline)
        listening = time.monotonic()
        answered, recovered = wait_recovered(broker.port, broker, args.tasks, deadline)
        rss = broker.rss_bytes()
        print(f"restart with {args.tasks:,} live tasks: listening after {listening - started:.2f} s, "
              f"answering after {answered - started:.2f} s, STATS shows all {args.tasks:,} after "
              f"{recovered - started:.2f} s")
        print(f"broker log: {broker.last_recovery_line()}")
        print(f"broker RSS after the restart: {_mib(rss)}")
        print(f"peak RSS since the restart: {peak_rss(broker)}")
        broker.terminate(timeout=args.timeout)
    except BaseException:
        broker.kill()
        raise
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
