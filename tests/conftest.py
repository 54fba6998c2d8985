"""Fixtures that run a real broker (`python -m actors`) in a subprocess on a free port and a temp data dir.

Tests talk to it over real sockets with the Python client; `BrokerProcess.kill()` is a real SIGKILL.
Settings are passed as `TQ_<SECTION>__<KEY>` environment variables, exactly as users set them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from transport.client import Client

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """A broker subprocess; `env` holds its TQ_* settings and survives restarts (same data dir)."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {
            "TQ_BROKER__HOST": "127.0.0.1",
            "TQ_BROKER__PORT": str(self.port),
            "TQ_PERSISTENCE__DATA_DIR": str(data_dir),
            "TQ_MONITORING__PROMETHEUS_PORT": str(self.metrics_port),
            "TQ_MONITORING__PROMETHEUS_HOST": "127.0.0.1",
            "TQ_API__REST_PORT": "0",  # off unless a test turns it on (tests.rest_helpers)
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"broker-{self.port}.log"
        self._clients: list[Client] = []

    def start(self, extra_args: list[str] | None = None) -> BrokerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "actors", *(extra_args or [])], cwd=ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)  # polling for the listener; not hiding a race
        raise RuntimeError(f"broker did not listen within {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs: object) -> Client:
        client = Client("127.0.0.1", self.port, **kwargs)  # type: ignore[arg-type]
        self._clients.append(client)
        return client

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> BrokerProcess:
        self.close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        return self.start()

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def stop(self) -> None:
        self.close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator:
    """A factory: `make_broker(TQ_BROKER__MAX_CONNECTIONS="3")` starts a broker with those settings."""
    brokers: list[BrokerProcess] = []

    def make(**env: str) -> BrokerProcess:
        broker = BrokerProcess(tmp_path / f"data{len(brokers)}", env)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(make_broker) -> BrokerProcess:  # type: ignore[no-untyped-def]
    """A broker on defaults, except short timers so tests of time-driven behaviour run quickly."""
    return make_broker()


@pytest.fixture
def client(broker: BrokerProcess) -> Client:
    return broker.client()
