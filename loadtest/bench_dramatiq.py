"""Dramatiq as a benchmark peer: its actors, producer adapter and worker command (see bench_redis.py).

Importing this module declares the actors on a RedisBroker at BENCH_REDIS_PORT, as Dramatiq's worker CLI
(`dramatiq loadtest.bench_dramatiq`) does in its own processes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from loadtest import bench_redis
from loadtest.bench_procs import HOST

QUEUE = "bench"
# h (restart with 1,000,000 tasks) is measured once, with RQ: filling 1,000,000 one send at a time takes minutes
RESTART_FIGURE = False
ABOUT = ("Dramatiq on redis-server (appendonly, appendfsync everysec): producer = actor.send; no batch or "
         "pipelined submit; workers = `dramatiq --processes 1 --threads 10`; tasks do one INCR/RPUSH to be counted")

broker = RedisBroker(host=HOST, port=int(os.environ.get("BENCH_REDIS_PORT", "6379")))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(payload: str) -> None:
    bench_redis.task_done(payload)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def stamped(at: float, payload: str) -> None:
    bench_redis.task_latency(at, payload)


class Producer:
    submit_many = None

    def __init__(self, port: int) -> None:
        pass

    def submit(self, payload: str) -> None:
        noop.send(payload)

    def submit_stamped(self, at: float, payload: str) -> None:
        stamped.send(at, payload)


def worker_commands(port: int, concurrency: int) -> list[list[str]]:
    exe = str(Path(sys.executable).with_name("dramatiq"))
    return [[exe, "loadtest.bench_dramatiq", "--processes", "1", "--threads", str(concurrency), "--queues", QUEUE]]
