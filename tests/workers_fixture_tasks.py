"""A user task module for the worker tests: imported by the tests (to submit) and by the worker
subprocesses (`python -m actors worker tests.workers_fixture_tasks`) to run.

Tasks that must wait for the test wait on a file instead of sleeping for a guessed time, so each test
decides exactly when a task may finish.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from actors.worker import Reject, Retry, task

QUEUE = "wtests"


@task(queue=QUEUE)
def add(a: int, b: int = 0) -> int:
    return a + b


@task(queue=QUEUE, name="fixture.echo")
def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


@task(queue=QUEUE, max_retries=2)
def always_fails(message: str) -> None:
    raise ValueError(message)


@task(queue=QUEUE, max_retries=3)
def retry_once(marker: str) -> str:
    """Asks for a retry on its first run (the marker file does not exist yet), succeeds on the second."""
    path = Path(marker)
    if not path.exists():
        path.write_text("seen")
        raise Retry("not ready yet", delay=0.1)
    return "second run"


@task(queue=QUEUE, max_retries=5)
def rejects(reason: str) -> None:
    raise Reject(reason)


@task(queue=QUEUE)
def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Returns once `path` exists (polled every 20 ms), or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    return "released"


@task(queue=QUEUE, lease_ms=1000)
def cpu_spin(seconds: float) -> int:
    """Pure-Python busy loop holding the GIL for `seconds`: longer than its 1 s lease."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


@task(queue=QUEUE)
def pid() -> int:
    return os.getpid()


@task(queue=QUEUE)
def returns_object() -> object:
    return object()
