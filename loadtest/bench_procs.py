"""Processes of the benchmark: the servers under test (broker, echo server) and the load processes.

Client and server never share a process: each server is a subprocess, and each load function of
`loadtest.bench_load` (or a peer's) runs in a fresh `spawn`ed process, started together by `run_loads`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_ctx = multiprocessing.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> float:
    """Seconds until `port` accepts a connection; raises if the process dies first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return time.monotonic() - start
        except OSError:
            time.sleep(0.01)  # polling for the listener
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


class Server:
    """A server subprocess on a free loopback port, with its own temp directory."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"tq-bench-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> Server:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.startup_s = wait_listening(self.port, self.proc, self.name)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_bytes(self) -> int:
        """RSS of the server and every process it started (tqbroker's database process included)."""
        return sum(self.rss_parts())

    def rss_parts(self) -> tuple[int, int]:
        """(RSS of the server process, RSS of all the processes it started)."""
        root = psutil.Process(self.pid)
        return root.memory_info().rss, sum(p.memory_info().rss for p in root.children(recursive=True))

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> tuple[float, bool]:
        """SIGTERM and wait: (seconds, whether it exited by itself; if not, it was killed at `timeout`)."""
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
            clean = True
        except subprocess.TimeoutExpired:
            self.kill()
            clean = False
        return time.monotonic() - start, clean

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate(timeout=15)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class Broker(Server):
    """`python -m actors` on default settings, except the overrides given (printed with the results)."""

    name = "tqbroker"

    def __init__(self, **overrides: str) -> None:
        super().__init__()
        self.overrides = overrides

    def command(self) -> list[str]:
        return [sys.executable, "-m", "actors"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
        env.update({
            "PYTHONPATH": str(ROOT), "TQ_BROKER__HOST": HOST, "TQ_BROKER__PORT": str(self.port),
            "TQ_PERSISTENCE__DATA_DIR": str(self.dir / "data"), "TQ_MONITORING__PROMETHEUS_PORT": "0",
            "TQ_MONITORING__LOG_LEVEL": "warning", "TQ_API__REST_PORT": "0", **self.overrides,
        })
        return env


class EchoServer(Server):
    name = "echo"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "loadtest.echo_server", "--host", HOST, "--port", str(self.port)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT)}


def _child(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any], results: Any, index: int) -> None:
    try:
        value = fn(**kwargs)
        value["load_cpu_s"] = time.process_time()
        results.put((index, value, None))
    except BaseException as exc:  # reported to the parent, which raises it with the figure's name
        results.put((index, None, f"{type(exc).__name__}: {exc}"))


def run_loads(*loads: tuple[Callable[..., dict[str, Any]], dict[str, Any]], timeout: float = 600.0,
              ready_first: bool = False) -> list[dict[str, Any]]:
    """Runs each `(fn, kwargs)` in its own spawned process, all at once; their results in order.

    With `ready_first`, the first load gets a `ready` event and the others start only once it is set (a
    worker that must be waiting before the producer starts).
    """
    results = _ctx.Queue()
    procs = []
    ready = _ctx.Event() if ready_first else None
    for index, (fn, kwargs) in enumerate(loads):
        if ready is not None and index == 0:
            kwargs = {**kwargs, "ready": ready}
        proc = _ctx.Process(target=_child, args=(fn, kwargs, results, index), daemon=True)
        proc.start()
        procs.append(proc)
        if ready is not None and index == 0 and not ready.wait(30):
            raise RuntimeError(f"{fn.__name__} did not become ready within 30 s")
    out: list[dict[str, Any] | None] = [None] * len(loads)
    errors = []
    for _ in loads:
        index, value, error = results.get(timeout=timeout)
        out[index] = value
        if error:
            errors.append(f"{loads[index][0].__name__}: {error}")
    for proc in procs:
        proc.join(10)
    if errors:
        raise RuntimeError("; ".join(errors))
    return out  # type: ignore[return-value]


class CpuMeter:
    """CPU seconds used while a figure ran: by the server, and by everything else on the machine.

    The machine is shared (2 cores); `other_cpu_pct` is the machine's busy time minus the server's and the
    load processes', so a figure taken while other work ran says so.
    """

    def __init__(self, server: Server | None) -> None:
        self.server = psutil.Process(server.pid) if server is not None else None

    def __enter__(self) -> CpuMeter:
        self.wall = time.monotonic()
        self.machine = _busy(psutil.cpu_times())
        self.server_cpu = _proc_cpu(self.server)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.wall
        self.machine = _busy(psutil.cpu_times()) - self.machine
        self.server_cpu = _proc_cpu(self.server) - self.server_cpu

    def annotate(self, result: dict[str, Any], load_cpu_s: float) -> dict[str, Any]:
        wall = max(self.wall, 1e-9)
        timed = result.get("seconds") or wall  # the server works in the timed window, not during spawning
        result["server_cpu_pct"] = 100 * self.server_cpu / timed
        result["load_cpu_pct"] = 100 * load_cpu_s / wall
        result["other_cpu_pct"] = max(0.0, 100 * (self.machine - self.server_cpu - load_cpu_s) / wall)
        return result


def _busy(times: Any) -> float:
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _proc_cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def measured(server: Server | None, *loads: tuple[Callable[..., dict[str, Any]], dict[str, Any]],
             ready_first: bool = False) -> list[dict[str, Any]]:
    """`run_loads`, with the server's and the machine's CPU use recorded in the first result."""
    with CpuMeter(server) as meter:
        out = run_loads(*loads, ready_first=ready_first)
    meter.annotate(out[0], sum(r.get("load_cpu_s", 0.0) for r in out))
    return out


def run_load(fn: Callable[..., dict[str, Any]], timeout: float = 600.0, **kwargs: Any) -> dict[str, Any]:
    return run_loads((fn, kwargs), timeout=timeout)[0]
