"""The worker runtime end to end: a real broker subprocess (conftest), real worker subprocesses
(`python -m actors worker tests.workers_fixture_tasks ...`), and the SDK in this process.

Most tests share one broker with short timers (heartbeat 1 s, so a silent worker is dead after 2 s);
the CPU-bound-lease test and the broker-restart test get their own. Tasks that must be "mid-run" wait
for a file the test creates, so nothing depends on guessed sleeps; every wait polls with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the fixture tasks' kinds are named after `tests.workers_fixture_tasks`
    sys.path.insert(0, str(ROOT))

from actors.worker import (  # noqa: E402
    TaskFailed,
    TaskHandle,
    connect,
    encode_payload,
    sdk,
)
from tests import workers_fixture_tasks as fx  # noqa: E402
from tests.conftest import BrokerProcess  # noqa: E402
from transport.client import Client  # noqa: E402
from transport.messages import TaskInfo, WorkerInfo  # noqa: E402

FAST_BROKER = {
    "TQ_WORKER__HEARTBEAT_INTERVAL_SECS": "1",
    "TQ_BROKER__MAINTENANCE_INTERVAL_SECS": "0.5",
    "TQ_BROKER__LEASE_CHECK_INTERVAL_SECS": "0.2",
    "TQ_BROKER__RETRY_BACKOFF_BASE_MS": "20",
    "TQ_BROKER__RETRY_BACKOFF_MAX_MS": "100",
}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` every 20 ms until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class WorkerProcess:
    """One `python -m actors worker` subprocess in its own session (so teardown can kill its pool too)."""

    def __init__(self, broker: BrokerProcess, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.broker = broker
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
        full_env.update({
            "PYTHONPATH": str(ROOT), "TQ_BROKER__HOST": "127.0.0.1", "TQ_BROKER__PORT": str(broker.port),
            "TQ_MONITORING__JSON_LOGGING": "false", "TQ_WORKER__HEARTBEAT_INTERVAL_SECS":
                broker.env.get("TQ_WORKER__HEARTBEAT_INTERVAL_SECS", "15"), **env,
        })
        self.log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "actors", "worker", "tests.workers_fixture_tasks", *args], cwd=ROOT,
                env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_registered(self, client: Client, timeout: float = 20.0) -> WorkerInfo:
        return wait_until(lambda: next((w for w in client.workers() if w.pid == self.pid and w.alive), None),
                          timeout, f"worker {self.pid} to register:\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_until(lambda: text in self.log(), timeout, f"{text!r} in the worker log:\n{self.log()}")

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit within {timeout} s:\n{self.log()}") from None

    def kill_session(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path_factory.mktemp("shared") / "data", dict(FAST_BROKER)).start()
    yield broker
    broker.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """`start_worker(broker, "--concurrency", "2", env={...})`; every worker left running is killed after."""
    workers: list[WorkerProcess] = []

    def start(broker: BrokerProcess, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(broker, list(args), env or {}, tmp_path)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill_session()


@pytest.fixture
def admin(shared_broker: BrokerProcess) -> Iterator[Client]:
    """A raw client for inspection, with the SDK's default connection pointed at the same broker."""
    connect("127.0.0.1", shared_broker.port)
    client = Client("127.0.0.1", shared_broker.port)
    yield client
    client.close()
    sdk.get_client().close()


def state_of(handle: TaskHandle) -> TaskInfo:
    return handle.status()


# ---------------------------------------------------------------- results, failures, retries


def test_results_come_back_through_handle_result_and_the_worker_registers_what_it_serves(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client) -> None:
    worker = start_worker(shared_broker, "--concurrency", "3", "--name", "basic")
    info = worker.wait_registered(admin)
    assert (info.name, info.queues, info.concurrency) == ("basic", ["wtests"], 3)
    assert fx.add.kind in info.metadata["kinds"].split(",") and info.metadata["pool"] == "threads"

    assert fx.add.submit(2, b=40).result(timeout=10) == 42
    assert fx.echo.submit("x", [1, 2], k={"n": None}).result(timeout=10) == {
        "args": ["x", [1, 2]], "kwargs": {"k": {"n": None}}}
    handles = fx.add.submit_many([(i, i) for i in range(50)])
    assert [h.result(timeout=10) for h in handles] == [2 * i for i in range(50)]

    beat = wait_until(lambda: next(w for w in admin.workers() if w.pid == worker.pid).memory_bytes > 0, 5,
                      "a heartbeat carrying the worker's memory")
    assert beat


def test_an_exception_is_retried_then_fails_with_the_error_text(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client) -> None:
    start_worker(shared_broker)
    handle = fx.always_fails.submit("boom")  # max_retries=2: three runs in all
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=20)
    assert info.value.error.startswith("ValueError: boom\nTraceback")
    assert "raise ValueError(message)" in info.value.error
    assert handle.status().attempts == 3


def test_the_last_failed_attempt_is_logged_as_giving_up_not_as_will_retry(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client) -> None:
    worker = start_worker(shared_broker)
    handle = fx.always_fails.submit("gives-up")  # max_retries=2: three runs in all
    with pytest.raises(TaskFailed):
        handle.result(timeout=20)
    worker.wait_log("task failed after 3 attempts; giving up: ValueError: gives-up")
    assert worker.log().count("task failed (will retry): ValueError: gives-up") == 2


def test_retry_runs_the_task_again_and_reject_fails_it_at_once(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client,
        tmp_path: Path) -> None:
    start_worker(shared_broker)
    retried = fx.retry_once.submit(str(tmp_path / "marker"))
    rejected = fx.rejects.submit("bad input")  # max_retries=5, but Reject means no retry
    assert retried.result(timeout=20) == "second run"
    assert retried.status().attempts == 2
    with pytest.raises(TaskFailed, match="Reject: bad input"):
        rejected.result(timeout=20)
    assert rejected.status().attempts == 1


def test_a_task_of_an_unknown_kind_fails_clearly_and_the_worker_keeps_working(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client) -> None:
    worker = start_worker(shared_broker)
    orphan = TaskHandle(admin.submit("nobody.serves.this", encode_payload(), queue=fx.QUEUE,
                                     max_retries=5).task_id)
    with pytest.raises(TaskFailed, match="no loaded module defines a task of kind 'nobody.serves.this'"):
        orphan.result(timeout=10)
    assert orphan.status().attempts == 1
    assert fx.add.submit(1, 1).result(timeout=10) == 2
    assert worker.proc.poll() is None


def test_the_process_pool_runs_tasks_in_child_processes(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client) -> None:
    worker = start_worker(shared_broker, "--pool", "processes", "--concurrency", "2")
    assert worker.wait_registered(admin).metadata["pool"] == "processes"
    child_pid = fx.pid.submit().result(timeout=20)
    assert isinstance(child_pid, int) and child_pid != worker.pid
    with pytest.raises(TaskFailed, match="Reject: no"):
        fx.rejects.submit("no").result(timeout=10)
    assert fx.add.submit(3, 4).result(timeout=10) == 7
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait_exit() == 0


# ---------------------------------------------------------------- shutdown and dead workers


def test_sigterm_lets_the_running_task_finish_claims_nothing_more_and_exits_0(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client,
        tmp_path: Path) -> None:
    worker = start_worker(shared_broker, "--concurrency", "1")
    gate = tmp_path / "gate"
    running = fx.wait_for_file.submit(str(gate))
    wait_until(lambda: state_of(running).state == "running", 10, "the task to start")
    worker.proc.send_signal(signal.SIGTERM)
    worker.wait_log("stopping: SIGTERM received")
    waiting = fx.add.submit(1, 2)  # submitted after the signal: must stay pending for another worker
    assert worker.proc.poll() is None  # still finishing its task
    gate.touch()
    assert running.result(timeout=10) == "released"
    assert worker.wait_exit() == 0
    assert "worker deregistered" in worker.log()
    info = waiting.status()
    assert (info.state, info.attempts) == ("pending", 0)
    assert all(w.pid != worker.pid for w in admin.workers())
    waiting.cancel()


def test_sigterm_with_a_short_grace_returns_a_long_task_to_pending_with_its_attempt_uncounted(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client,
        tmp_path: Path) -> None:
    worker = start_worker(shared_broker, env={"TQ_WORKER__GRACEFUL_SHUTDOWN_TIMEOUT_SECS": "0.3"})
    long_task = fx.wait_for_file.submit(str(tmp_path / "never"))
    wait_until(lambda: state_of(long_task).state == "running", 10, "the task to start")
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait_exit() == 0
    assert time.monotonic() - started < 5
    info = long_task.status()
    assert (info.state, info.attempts) == ("pending", 0)
    long_task.cancel()


def test_a_second_signal_exits_at_once_with_status_1_after_deregistering(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client,
        tmp_path: Path) -> None:
    worker = start_worker(shared_broker)  # graceful timeout 60 s: only the second signal ends it early
    long_task = fx.wait_for_file.submit(str(tmp_path / "never"))
    wait_until(lambda: state_of(long_task).state == "running", 10, "the task to start")
    worker.proc.send_signal(signal.SIGINT)
    worker.wait_log("stopping: SIGINT received")
    worker.proc.send_signal(signal.SIGINT)
    assert worker.wait_exit(timeout=5) == 1
    info = long_task.status()
    assert (info.state, info.attempts) == ("pending", 0)
    long_task.cancel()


def test_a_killed_workers_task_is_reclaimed_and_completed_by_a_second_worker(
        shared_broker: BrokerProcess, start_worker: Callable[..., WorkerProcess], admin: Client,
        tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first = start_worker(shared_broker)
    handle = fx.wait_for_file.submit(str(gate))
    first_id = wait_until(lambda: state_of(handle).worker_id if state_of(handle).state == "running" else None,
                          10, "the first worker to run the task")
    first.kill_session()  # SIGKILL: no DEREGISTER, no more heartbeats
    gate.touch()
    second = start_worker(shared_broker)
    second_id = second.wait_registered(admin).worker_id
    assert handle.result(timeout=15) == "released"
    info = handle.status()
    assert (info.attempts, info.worker_id) == (2, second_id) and first_id != second_id


# ---------------------------------------------------------------- heartbeats and reconnecting


def test_a_cpu_bound_task_longer_than_its_lease_completes_once(
        make_broker: Callable[..., BrokerProcess], start_worker: Callable[..., WorkerProcess]) -> None:
    broker = make_broker(TQ_WORKER__HEARTBEAT_INTERVAL_SECS="0.3", TQ_BROKER__LEASE_CHECK_INTERVAL_SECS="0.1",
                         TQ_BROKER__MAINTENANCE_INTERVAL_SECS="0.2")
    connect("127.0.0.1", broker.port)
    try:
        start_worker(broker, "--concurrency", "2")
        handle = fx.cpu_spin.submit(3.0)  # lease_ms=1000: only heartbeats during the loop keep it
        assert handle.result(timeout=20) > 0
        info = handle.status()
        assert (info.state, info.attempts) == ("completed", 1)
        assert "lease expired" not in broker.log() and "declared dead" not in broker.log()
    finally:
        sdk.get_client().close()


def test_the_worker_reconnects_after_a_broker_restart_and_delivers_results_held_meanwhile(
        make_broker: Callable[..., BrokerProcess], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    # A dead-worker window (2 x 3 s) longer than the longest reconnect backoff (5 s): the worker is back
    # before the restarted broker could declare it dead, so the task keeps its one attempt.
    broker = make_broker(TQ_WORKER__HEARTBEAT_INTERVAL_SECS="3")
    connect("127.0.0.1", broker.port)
    try:
        worker = start_worker(broker, env={"TQ_WORKER__MAX_INACTIVITY_SECS": "1"})
        assert fx.add.submit(1, 2).result(timeout=10) == 3
        gate = tmp_path / "gate"
        held = fx.wait_for_file.submit(str(gate))
        wait_until(lambda: state_of(held).state == "running", 10, "the task to start")
        broker.kill()
        gate.touch()  # the task ends while the broker is down: its RESULT waits for the reconnect
        worker.wait_log("result(s) kept for delivery after reconnecting")
        worker.wait_log("nothing heard from the broker")  # worker.max_inactivity_secs, and it keeps trying
        broker.start()
        assert held.result(timeout=20) == "released"
        assert held.status().attempts == 1
        worker.wait_log("re-registered as")
        assert fx.add.submit(2, 2).result(timeout=10) == 4
    finally:
        sdk.get_client().close()
