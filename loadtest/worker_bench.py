"""End-to-end worker throughput: submit N no-op tasks, then drain them with C worker connections.

    python -m loadtest.worker_bench --host 127.0.0.1 --port 6379 --tasks 20000 --connections 10

Phase 1 submits the tasks with SUBMIT_BATCH (not timed into the result). Phase 2 starts C processes
(`multiprocessing`, spawn), each with one raw client looping CLAIM(max_tasks=10) → all RESULTs of that
claim pipelined in one `sendall` → CLAIM ...; the clock runs from releasing them all at once to the last
RESULT acknowledged. What it measures is the broker's claim/complete path (WAL writes included), not
user code: the tasks do nothing and the workers never decode a payload. It is not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from typing import Any

from transport import messages as m
from transport.client import Client

KIND = "bench.noop"
BATCH = 5_000


def submit_all(client: Client, queue: str, tasks: int) -> float:
    """Submit `tasks` no-op tasks in SUBMIT_BATCHes; returns the seconds it took."""
    started = time.perf_counter()
    left = tasks
    while left:
        n = min(BATCH, left)
        client.submit_batch([m.TaskSpec(kind=KIND, queue=queue)] * n)
        left -= n
    return time.perf_counter() - started


def drain(index: int, host: str, port: int, api_key: str | None, queue: str, total: int, done: Any,
          go: Any, out: Any) -> None:
    """One worker connection (in its own process): claim and complete until every task is done."""
    client = Client(host, port, api_key, client_name=f"worker-bench-{index}")
    worker_id = f"bench-{os.getpid()}"
    client.register(worker_id, name=worker_id, pid=os.getpid(), queues=[queue], concurrency=10)
    if not go.wait(timeout=120):  # the parent died before starting the clock
        return
    mine = 0
    while True:
        with done.get_lock():
            if done.value >= total:
                break
        tasks = client.claim(worker_id, [queue], max_tasks=10, wait_ms=100)
        if not tasks:
            continue
        client.pipeline([m.Result(id=0, worker_id=worker_id, task_id=t.task_id, ok=True) for t in tasks])
        mine += len(tasks)
        with done.get_lock():
            done.value += len(tasks)
            if done.value >= total:
                out.put(("finished", time.perf_counter()))
    out.put(("count", mine))
    client.deregister(worker_id)
    client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.worker_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--api-key", default=os.environ.get("TQ_API_KEY"))
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--queue", default=f"bench-{os.getpid()}", help="a fresh queue by default, so "
                   "leftover tasks of other runs do not count")
    args = p.parse_args(argv)

    with Client(args.host, args.port, args.api_key, client_name="worker-bench") as client:
        submit_s = submit_all(client, args.queue, args.tasks)
        print(f"submitted {args.tasks} tasks in {submit_s:.2f} s ({args.tasks / submit_s:,.0f}/s)")
        before = client.stats().completed_total

        ctx = multiprocessing.get_context("spawn")
        done, go, out = ctx.Value("q", 0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=drain, args=(i, args.host, args.port, args.api_key, args.queue, args.tasks,
                                                 done, go, out), daemon=True) for i in range(args.connections)]
        for proc in procs:
            proc.start()
        pids = {proc.pid for proc in procs}
        while (sum(w.pid in pids for w in client.workers()) < len(procs)
               and all(proc.is_alive() for proc in procs)):
            time.sleep(0.05)  # waiting for every process to register before starting the clock
        started = time.perf_counter()
        go.set()
        finished, counts = None, []
        while len(counts) < len(procs):
            kind, value = out.get(timeout=600)
            if kind == "finished":
                finished = value
            else:
                counts.append(value)
        for proc in procs:
            proc.join(10)
        completed = client.stats().completed_total - before
    if finished is None:
        print("the workers stopped before every task was done", file=sys.stderr)
        return 1
    elapsed = finished - started
    print(f"completed {completed} tasks with {args.connections} connections in {elapsed:.2f} s: "
          f"{args.tasks / elapsed:,.0f} tasks/s end to end (per connection: {sorted(counts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
