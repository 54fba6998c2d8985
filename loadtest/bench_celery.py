"""Celery as a benchmark peer: its app and tasks, producer adapter and worker command (see bench_redis.py).

Importing this module builds the app on the Redis at BENCH_REDIS_PORT, as `celery -A loadtest.bench_celery
worker` does in its own process. Results are ignored (no result backend), as a fire-and-forget queue.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from celery import Celery, group

from loadtest import bench_redis
from loadtest.bench_procs import HOST

QUEUE = "bench"
RESTART_FIGURE = True
ABOUT = ("Celery on redis-server (appendonly, appendfsync everysec): producer = task.delay, c = "
         "group(1,000 signatures).apply_async (one message each); workers = `celery worker -P prefork -c 10`; "
         "tasks do one INCR/RPUSH to be counted")

app = Celery("bench", broker=f"redis://{HOST}:{os.environ.get('BENCH_REDIS_PORT', '6379')}/0")
app.conf.update(task_ignore_result=True, task_default_queue=QUEUE, broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False)


@app.task(name="bench.noop")
def noop(payload: str) -> None:
    bench_redis.task_done(payload)


@app.task(name="bench.stamped")
def stamped(at: float, payload: str) -> None:
    bench_redis.task_latency(at, payload)


class Producer:
    def __init__(self, port: int) -> None:
        pass

    def submit(self, payload: str) -> None:
        noop.delay(payload)

    def submit_stamped(self, at: float, payload: str) -> None:
        stamped.delay(at, payload)

    def submit_many(self, n: int, payload: str) -> None:
        group(noop.s(payload) for _ in range(n)).apply_async()


def worker_commands(port: int, concurrency: int) -> list[list[str]]:
    exe = str(Path(sys.executable).with_name("celery"))
    return [[exe, "-A", "loadtest.bench_celery", "worker", "-Q", QUEUE, "-P", "prefork", "-c", str(concurrency),
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]]
