"""History lookups and appends at scale (issue 14): builds N task_history rows straight into a DuckDB file,
starts a broker on it, and measures STATUS of old finished tasks through the wire.

    python -m loadtest.history_bench --rows 1000000 [--lookups 500] [--pipelined 20000] [--keep DIR]

Prints: build time; STATUS of random old ids one at a time (p50/p99); pipelined STATUS of random old ids
and of consecutive ids (a producer waiting for its own batch) per second; ids that cannot exist
(malformed, future, not yet issued: p50/p99); history append rows/s through the database process's pipe
(the broker's own path, storage.db_process) with the longest gevent hub stall meanwhile.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent

from loadtest.bench_procs import HOST, ROOT, free_port, wait_listening
from storage.database import Database
from storage.db_process import DatabaseProcess
from storage.history_ids import KEY_SQL
from storage.model import TaskRecord
from transport import messages as m
from transport.client import Client
from transport.errors import NotFound

RUN_TASKS = 1_000_000  # tasks per simulated broker run (each run has its own id prefix)
RUN_SPACING_MS = 30_000  # 1M tasks at 35,000/s take 28.6 s
RATE = 35_000.0  # finishes per second within a run
APPEND_BATCH = 20_000  # actors.history_link's max_batch


def run_start_ms(base_ms: int, run: int) -> int:
    return base_ms + run * RUN_SPACING_MS


def task_id(base_ms: int, n: int) -> str:
    """The id of the n-th built row, as storage.history_ids expects (TaskIds' format)."""
    run, counter = divmod(n, RUN_TASKS)
    return f"{run_start_ms(base_ms, run):011x}{(run * 7919 + 12345) % (1 << 40):010x}{counter + 1:06x}"


def build(path: Path, rows: int) -> int:
    """Writes `rows` finished tasks (in finish order, as the broker appends them) and their keys; returns
    the first run's start in unix ms."""
    Database(path).close()  # the schema, by the broker's own migrations
    runs = (rows + RUN_TASKS - 1) // RUN_TASKS
    base_ms = int(time.time() * 1000) - runs * RUN_SPACING_MS - 60_000
    import duckdb  # only the build writes DuckDB directly

    conn = duckdb.connect(str(path))
    conn.execute("SET preserve_insertion_order = true")
    for first in range(0, rows, RUN_TASKS):
        run, count = first // RUN_TASKS, min(RUN_TASKS, rows - first)
        start_ms = run_start_ms(base_ms, run)
        finished = f"make_timestamp({start_ms} * 1000 + CAST(i * 1000000 / {RATE} AS BIGINT) + 500)"
        conn.execute(f"""INSERT INTO task_history SELECT
            printf('%011x', {start_ms}::BIGINT) || printf('%010x', {(run * 7919 + 12345) % (1 << 40)}::BIGINT)
                || printf('%06x', i + 1),
            'default', 'bench.echo', 100, 'completed', 1, 3, 'w-bench', {finished}, {finished}, {finished},
            {finished}, 0.5, 100, NULL, 'ok'::BLOB
            FROM range({count}) r(i) ORDER BY i""")
        conn.execute(f"""INSERT INTO history_keys SELECT {KEY_SQL}, finished_at FROM task_history
            WHERE finished_at >= make_timestamp({start_ms} * 1000)""")
    conn.execute("CHECKPOINT")
    conn.close()
    return base_ms


def percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return f"p50 {ordered[len(ordered) // 2] * 1e3:.3f} ms  p99 {ordered[int(len(ordered) * 0.99)] * 1e3:.3f} ms"


def one_at_a_time(client: Client, ids: list[str]) -> list[float]:
    took = []
    for tid in ids:
        start = time.perf_counter()
        info = client.status(tid)
        took.append(time.perf_counter() - start)
        assert info.state == "completed", info
    return took


def pipelined(client: Client, ids: list[str], window: int = 1000) -> float:
    start = time.perf_counter()
    for first in range(0, len(ids), window):
        replies = client.pipeline([m.Status(id=0, task_id=t) for t in ids[first:first + window]], timeout=120)
        assert all(r.task.state == "completed" for r in replies)
    return len(ids) / (time.perf_counter() - start)


def unknown(client: Client, current: str, count: int) -> list[float]:
    future = f"{int((time.time() + 86400) * 1000):011x}" + current[11:]
    samples = ["no-such-task", future, current[:-6] + "ffffff"]
    took = []
    for n in range(count):
        start = time.perf_counter()
        try:
            client.status(samples[n % len(samples)])
        except NotFound:
            took.append(time.perf_counter() - start)
    assert len(took) == count
    return took


def appends(path: Path, batches: int) -> tuple[float, float]:
    """Rows/s of history.append in APPEND_BATCH batches through a database process, and the longest hub
    gap seen by a greenlet sleeping 1 ms meanwhile (what the broker's other greenlets would feel)."""
    db = DatabaseProcess(path)
    now = time.time()
    gaps: list[float] = []

    def ticker() -> None:
        while True:
            before = time.perf_counter()
            gevent.sleep(0.001)
            gaps.append(time.perf_counter() - before - 0.001)

    def tasks(b: int) -> list[TaskRecord]:
        return [TaskRecord(task_id=f"{int(now * 1000):011x}{b:010x}{n:06x}", queue="default", kind="bench.echo",
                           payload=b"x" * 100, priority=100, state="completed", attempts=1, max_retries=3,
                           lease_ms=30000, submitted_at=now, run_at=now, started_at=now, finished_at=now + n / 1e6,
                           worker_id="w", result=b"ok") for n in range(APPEND_BATCH)]

    prepared = [tasks(b) for b in range(batches)]
    running = gevent.spawn(ticker)
    try:
        start = time.perf_counter()
        for b, batch in enumerate(prepared):
            db.history.append(batch, batch_id=f"bench-{b}")
        rate = batches * APPEND_BATCH / (time.perf_counter() - start)
    finally:
        running.kill()
        db.close()
    return rate, max(gaps, default=0.0)


def start_broker(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({"TQ_BROKER__HOST": HOST, "TQ_BROKER__PORT": str(port), "TQ_PERSISTENCE__DATA_DIR": str(data_dir),
                "TQ_API__REST_PORT": "0", "TQ_MONITORING__PROMETHEUS_PORT": str(free_port()),
                "TQ_MONITORING__PROMETHEUS_HOST": HOST, "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen([sys.executable, "-m", "actors"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_listening(port, proc, "broker", timeout=300)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=500, help="one-at-a-time STATUS of random old ids")
    parser.add_argument("--pipelined", type=int, default=20_000, help="pipelined STATUS of random old ids")
    parser.add_argument("--window", type=int, default=1000, help="STATUS requests in flight when pipelined")
    parser.add_argument("--append-batches", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="build into (or reuse) this data dir instead of a temp one")
    args = parser.parse_args()
    data_dir = args.keep or Path(tempfile.mkdtemp(prefix="tq-history-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "tqbroker.duckdb"
    start = time.perf_counter()
    base_file = data_dir / "history_bench.base"
    if path.exists() and base_file.exists():
        base_ms = int(base_file.read_text())
        print(f"reusing {args.rows:,} rows in {path}")
    else:
        base_ms = build(path, args.rows)
        base_file.write_text(str(base_ms))
        print(f"built {args.rows:,} rows in {time.perf_counter() - start:.1f} s ({path.stat().st_size / 1e6:.0f} MB)")
    rate, stall = appends(data_dir / "append.duckdb", args.append_batches)
    print(f"history append, {APPEND_BATCH:,}-row batches via the database process: {rate:,.0f} rows/s; "
          f"longest hub stall {stall * 1e3:.1f} ms")
    proc, port = start_broker(data_dir)
    try:
        client = Client(HOST, port, timeout=120)
        pick = random.Random(14)
        old = [task_id(base_ms, pick.randrange(args.rows)) for _ in range(args.lookups)]
        one_at_a_time(client, old[:20])  # warm-up: the database process's first reads
        took = one_at_a_time(client, old)
        print(f"STATUS of an old finished task, one at a time ({args.lookups}): {percentiles(took)}")
        scattered = [task_id(base_ms, pick.randrange(args.rows)) for _ in range(args.pipelined)]
        rate = pipelined(client, scattered, args.window)
        print(f"STATUS pipelined, random old ids ({args.pipelined:,}, {args.window} in flight): {rate:,.0f}/s")
        first = pick.randrange(max(args.rows - args.pipelined, 1))
        batch = [task_id(base_ms, n) for n in range(first, min(first + args.pipelined, args.rows))]
        rate = pipelined(client, batch, args.window)
        print(f"STATUS pipelined, consecutive old ids ({len(batch):,}): {rate:,.0f}/s")
        current = client.submit("bench.echo").task_id
        print(f"STATUS of an id that cannot exist (1000): {percentiles(unknown(client, current, 1000))}")
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
