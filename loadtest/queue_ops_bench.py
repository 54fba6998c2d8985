"""Queue operations through the wire: browse a page of 100 out of 1,000,000 pending (and SUBMIT p99 while
pages are read), requeue 10,000 dead tasks in one request, a rate limit's accuracy over 10 s with 10
claiming connections, and how soon after a minute boundary a `* * * * *` schedule fires. Each part starts
its own broker and takes under 60 s (browse: mostly submitting the million; cron: waiting for the minute).

    python -m loadtest.queue_ops_bench            # all parts
    python -m loadtest.queue_ops_bench browse     # or requeue, ratelimit, cron

Times are client round trips on an otherwise idle connection (an upper bound of the broker's time).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from loadtest.bench_procs import HOST, Broker
from transport.client import Client
from transport.messages import Submit, TaskSpec

BIG = {"TQ_BROKER__QUEUE_DEPTH_THRESHOLD": "100000000", "TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "3600"}


def _ms(samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=100)
    top = max(samples) * 1000
    return f"p50 {qs[49] * 1000:.2f} ms, p99 {qs[98] * 1000:.2f} ms, max {top:.2f} ms (n={len(samples)})"


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _fill(client: Client, tasks: int, queue: str, **spec: Any) -> None:
    batch = [TaskSpec(kind="k", payload=b"x" * 100, queue=queue, **spec)] * 10_000
    for _ in range(tasks // 10_000):
        client.submit_batch(batch)


def _submitter(port: int, seconds: float, out: Any) -> None:
    with Client(HOST, port) as client:
        msg, samples, end = Submit(id=0, task=TaskSpec(kind="s", queue="other")), [], time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.request(msg)
            samples.append(time.perf_counter() - t0)
            time.sleep(0.001)
    out.put(samples)


def _submit_p99_while(port: int, seconds: float, during: Callable[[], None] | None) -> list[float]:
    out: Any = mp.get_context("fork").Queue()
    proc = mp.get_context("fork").Process(target=_submitter, args=(port, seconds, out))
    proc.start()
    end = time.monotonic() + seconds
    while during is not None and time.monotonic() < end:
        during()
    samples = out.get(timeout=seconds + 30)
    proc.join()
    return samples


def bench_browse() -> None:
    with Broker(**BIG) as broker, Client(HOST, broker.port, timeout=60) as c:
        t0 = time.perf_counter()
        _fill(c, 1_000_000, "big")
        print(f"browse: 1,000,000 pending submitted in {time.perf_counter() - t0:.1f} s")
        c.submit_batch([TaskSpec(kind="k", queue="small")] * 100)
        for queue, label in (("small", "100"), ("big", "1,000,000")):
            print(f"  first page of 100 of {label} pending: ",
                  _ms(_timed(lambda q=queue: c.browse("pending", queue=q), 300)))
        mid = c.browse("pending", queue="big", cursor="l:500000")  # a cursor the middle of the queue would give
        assert len(mid.tasks) == 100
        print("  page at 500,000 of 1,000,000:           ",
              _ms(_timed(lambda: c.browse("pending", queue="big", cursor="l:500000"), 300)))
        print("  newest page of 1,000,000:               ",
              _ms(_timed(lambda: c.browse("pending", queue="big", newest_first=True), 300)))
        cursor: list[str | None] = [None]

        def next_page() -> None:
            page = c.browse("pending", queue="big", cursor=cursor[0])
            cursor[0] = page.next

        print("  walking pages 1..300 with the cursor:   ", _ms(_timed(next_page, 300)))
        print("  SUBMIT one at a time, idle broker:      ", _ms(_submit_p99_while(broker.port, 4, None)))
        print("  SUBMIT one at a time, pages being read: ", _ms(_submit_p99_while(broker.port, 4, next_page)))


def bench_requeue() -> None:
    with Broker(TQ_BROKER__MAX_BATCH_CLAIM="1000", **BIG) as broker, Client(HOST, broker.port, timeout=60) as c:
        _fill(c, 10_000, "q", max_retries=0)
        from transport.messages import Result

        for _ in range(10):
            jobs = c.claim("w", ["q"], max_tasks=1000, wait_ms=0)
            c.pipeline([Result(id=0, worker_id="w", task_id=j.task_id, ok=False, error="boom") for j in jobs])
        dead = sum(q.dead for q in c.queues())
        t0 = time.perf_counter()
        count = c.requeue(all=True)
        seconds = time.perf_counter() - t0
        print(f"requeue: {dead} dead tasks, one REQUEUE all: {count} requeued in {seconds * 1000:.1f} ms "
              f"(pending now {c.stats().pending})")


def _claimer(port: int, worker: str, seconds: float, start_at: float, out: Any) -> None:
    with Client(HOST, port, timeout=30) as client:
        while time.time() < start_at:
            time.sleep(0.001)
        stamps, end = [], start_at + seconds
        while (now := time.time()) < end:
            got = client.claim(worker, ["rl"], max_tasks=10, wait_ms=min(1000, max(1, int((end - now) * 1000))))
            stamps += [time.time()] * len(got)
    out.put(stamps)


def bench_ratelimit(rate: float = 500.0, seconds: float = 10.0, connections: int = 10) -> None:
    with Broker(**BIG) as broker, Client(HOST, broker.port, timeout=60) as c:
        _fill(c, 20_000, "rl")
        c.rate_limit("rl", rate)
        time.sleep(1.5)  # let the bucket fill to its burst, as for a limit set a while ago
        ctx = mp.get_context("fork")
        out: Any = ctx.Queue()
        start_at = time.time() + 1.0
        procs = [ctx.Process(target=_claimer, args=(broker.port, f"w{i}", seconds, start_at, out))
                 for i in range(connections)]
        for p in procs:
            p.start()
        stamps = sorted(s for _ in procs for s in out.get(timeout=seconds + 60))
        for p in procs:
            p.join()
        total = len(stamps)
        after_first = sum(1 for s in stamps if s >= start_at + 1.0)
        print(f"ratelimit {rate:g}/s, {connections} connections claiming for {seconds:g} s: {total} claimed "
              f"({total / seconds:.1f}/s, {100 * (total / seconds / rate - 1):+.1f} % incl. the burst of {rate:g}); "
              f"after the first second {after_first / (seconds - 1):.1f}/s "
              f"({100 * (after_first / (seconds - 1) / rate - 1):+.1f} %)")


def bench_cron() -> None:
    """`* * * * *`: how long after the next minute boundary its task is submitted (waits up to 60 s)."""
    with Broker() as broker, Client(HOST, broker.port, timeout=60) as c:
        c.schedule_add("every-minute", "* * * * *", TaskSpec(kind="tick", queue="cron"))
        boundary = (int(time.time()) // 60 + 1) * 60
        while not (page := c.browse("pending", queue="cron")).tasks:
            time.sleep(0.005)  # polling the broker for the fire; not part of what is measured
        [task] = page.tasks
        print(f"cron: '* * * * *' task submitted {(task.submitted_at - boundary) * 1000:.1f} ms after the minute "
              f"boundary (unique key cron:every-minute:{boundary})")


PARTS = {"browse": bench_browse, "requeue": bench_requeue, "ratelimit": bench_ratelimit, "cron": bench_cron}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(PARTS):
        PARTS[name]()
