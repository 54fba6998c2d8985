"""Running one task: decoding its payload, calling the user function, and turning what happened into an
`Outcome` (the RESULT to send). Plus the two places user code runs: OS threads or child processes.

Why real OS threads: the worker runtime lives under gevent monkey patching, where `threading.Thread` is a
greenlet; a CPU-bound task on a greenlet would never yield and heartbeats would stop, so the broker would
declare the worker dead and run its tasks twice. `gevent.threadpool.ThreadPool` runs functions on real
threads, and the interpreter's switch interval (lowered to 1 ms) hands the GIL back to the hub thread
often enough for heartbeats. `--pool processes` sidesteps the GIL altogether (and isolates crashes) at the cost of
pickling nothing but `(kind, payload)` and a child interpreter per slot, started with `spawn` so no
gevent hub or lock state is forked.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import signal
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

import msgspec
import psutil

from actors.worker.exceptions import Reject, Retry
from actors.worker.sdk import decode_payload, encode_result, registered_tasks
from transport.messages import MAX_RESULT_BYTES

log = logging.getLogger("tqbroker.worker")

SWITCH_INTERVAL_S = 0.001
MAX_ERROR_CHARS = 8_000  # far under the protocol's 65,536, so a RESULT is never refused for its error
TRACEBACK_FRAMES = 4


class Outcome(msgspec.Struct, frozen=True):
    """What one run produced: the fields of its RESULT, plus how long the user function took."""

    task_id: str
    ok: bool
    result: bytes | None = None
    error: str | None = None
    retry: bool = True
    seconds: float = 0.0


def format_error(exc: BaseException) -> str:
    """`ExcType: message` and the last few frames, bounded so it always fits a RESULT."""
    head = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)[-TRACEBACK_FRAMES:]
    tail = "".join(traceback.format_list(frames)).rstrip()
    text = f"{head}\nTraceback (last {len(frames)} frames):\n{tail}" if frames else head
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 15] + "\n...(truncated)"
    return text


def unknown_kind(task_id: str, kind: str, served: list[str]) -> Outcome:
    """A task this worker cannot run: fail it for good with a message saying what is served."""
    listed = ", ".join(served[:20]) + (", ..." if len(served) > 20 else "")
    return Outcome(task_id=task_id, ok=False, retry=False,
                   error=f"UnknownTaskKind: no loaded module defines a task of kind {kind!r} "
                         f"(this worker serves: {listed})")


def execute(task_id: str, kind: str, payload: bytes) -> Outcome:
    """Run one task to an Outcome. Never raises: every failure of user code becomes a failed RESULT.

    Runs in a pool thread or a child process, so it touches nothing but the registered task kinds (`registered_tasks`).
    """
    fn_task = registered_tasks().get(kind)
    if fn_task is None:
        return unknown_kind(task_id, kind, sorted(registered_tasks()))
    try:
        args, kwargs = decode_payload(payload)
    except ValueError as exc:
        return Outcome(task_id=task_id, ok=False, retry=False, error=f"BadPayload: {exc}")
    started = time.perf_counter()
    try:
        value = fn_task.fn(*args, **kwargs)
    except Retry as exc:
        return Outcome(task_id=task_id, ok=False, retry=True, error=f"Retry: {exc}",
                       seconds=time.perf_counter() - started)
    except Reject as exc:
        return Outcome(task_id=task_id, ok=False, retry=False, error=f"Reject: {exc}",
                       seconds=time.perf_counter() - started)
    except BaseException as exc:  # noqa: B036 - SystemExit in a task fails the task, not the worker
        return Outcome(task_id=task_id, ok=False, retry=True, error=format_error(exc),
                       seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    try:
        result = encode_result(value)
    except TypeError as exc:  # deterministic: the same code returns the same kind of value next time
        return Outcome(task_id=task_id, ok=False, retry=False, error=f"TypeError: {exc}", seconds=seconds)
    if len(result) > MAX_RESULT_BYTES:
        return Outcome(task_id=task_id, ok=False, retry=False, seconds=seconds,
                       error=f"ResultTooLarge: the result is {len(result)} bytes; at most {MAX_RESULT_BYTES} "
                             "fit a RESULT frame (store big results elsewhere and return a reference)")
    return Outcome(task_id=task_id, ok=True, result=result, seconds=seconds)


class Backend(Protocol):
    """Where user code runs. `run` blocks the calling greenlet (only) until the task is done."""

    name: str

    def run(self, task_id: str, kind: str, payload: bytes) -> Outcome: ...

    def close(self, idle: bool) -> None:
        """Release the pool; `idle` says no task is running (otherwise nothing may wait for them)."""


class ThreadBackend:
    """User code on real OS threads from gevent's thread pool (see the module docstring)."""

    name = "threads"

    def __init__(self, size: int) -> None:
        import gevent.threadpool

        self.pool = gevent.threadpool.ThreadPool(maxsize=size)
        # The hub thread waits up to one switch interval for the GIL after every block, so a short one
        # keeps heartbeats on time beside CPU-bound tasks (see docs/performance.md#worker-the-gil-switch-interval).
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    def run(self, task_id: str, kind: str, payload: bytes) -> Outcome:
        return self.pool.apply(execute, (task_id, kind, payload))

    def close(self, idle: bool) -> None:
        """Stops idle threads; one still running user code cannot be stopped and dies with the process."""
        self.pool.kill()


def _init_child(modules: list[str], path: list[str]) -> None:
    """A pool process's start: same import path as the worker, the task modules imported, and SIGINT
    ignored so a Ctrl-C sent to the whole process group leaves graceful shutdown to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path[:] = path
    for name in modules:
        importlib.import_module(name)


class ProcessBackend:
    """User code in a `ProcessPoolExecutor` of spawned children; a crashed child fails only its task."""

    name = "processes"

    def __init__(self, size: int, modules: list[str]) -> None:
        self.size = size
        self.modules = modules
        self.executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.size, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_child, initargs=(self.modules, list(sys.path)))

    def run(self, task_id: str, kind: str, payload: bytes) -> Outcome:
        executor = self.executor
        try:
            return executor.submit(execute, task_id, kind, payload).result()
        except BrokenProcessPool as exc:
            if executor is self.executor:  # the first task to notice replaces the pool for everyone
                log.error("a task process died (%s); starting a new process pool", exc,
                          extra={"task_id": task_id})
                executor.shutdown(wait=False, cancel_futures=True)
                self.executor = self._new_executor()
            return Outcome(task_id=task_id, ok=False, retry=True,
                           error=f"WorkerProcessDied: the process running the task exited abruptly ({exc})")

    def close(self, idle: bool) -> None:
        """Stop the pool; children still running user code are terminated rather than waited for,
        because the broker hands their tasks to other workers once this worker deregisters."""
        self.executor.shutdown(wait=idle, cancel_futures=True)
        if not idle:
            terminate_children()


def terminate_children(grace_s: float = 0.3) -> None:
    """SIGTERM (then SIGKILL) every descendant process, so no task outlives its worker."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
