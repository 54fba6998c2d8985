"""RQ as a benchmark peer: producer adapter and worker command (see loadtest/bench_redis.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from redis import Redis
from rq import Queue

from loadtest.bench_procs import HOST
from loadtest.bench_redis import task_done, task_latency

QUEUE = "bench"
RESTART_FIGURE = True  # run h (restart with 1,000,000 tasks) with this system
ABOUT = ("RQ on redis-server (appendonly, appendfsync everysec): producer = rq.Queue.enqueue, c = "
         "Queue.enqueue_many of 1,000 (one pipeline); workers = `rq worker -w rq.worker.SimpleWorker` x 10 "
         "processes (no fork per job); e/d tasks do one INCR/RPUSH to be counted")


class Producer:
    def __init__(self, port: int) -> None:
        self.queue = Queue(QUEUE, connection=Redis(host=HOST, port=port))

    def submit(self, payload: str) -> None:
        self.queue.enqueue(task_done, payload)

    def submit_stamped(self, at: float, payload: str) -> None:
        self.queue.enqueue(task_latency, at, payload)

    def submit_many(self, n: int, payload: str) -> None:
        self.queue.enqueue_many([Queue.prepare_data(task_done, (payload,)) for _ in range(n)])


def worker_commands(port: int, concurrency: int) -> list[list[str]]:
    """`concurrency` worker processes (RQ runs one job at a time per worker)."""
    rq = str(Path(sys.executable).with_name("rq"))
    return [[rq, "worker", "-w", "rq.worker.SimpleWorker", "-u", f"redis://{HOST}:{port}", "-q", QUEUE]
            for _ in range(concurrency)]


