"""A stop by SIGINT or SIGTERM sent to the broker's whole process group (Ctrl-C on `make run`, `timeout`,
systemd's KillMode=control-group, docker stop) is an ordinary stop: exit 0, the final snapshot taken, and
no traceback or ERROR line from the database process, which ignores those signals and leaves when the
broker tells it to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, BrokerProcess


def start_in_own_group(broker: BrokerProcess) -> BrokerProcess:
    """Starts the broker as a terminal would: leader of a process group that a signal can target whole."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update(broker.env)
    env["PYTHONPATH"] = str(ROOT)
    with open(broker.log_path, "ab") as log:
        broker.proc = subprocess.Popen([sys.executable, "-m", "actors"], cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    broker._wait_listening()
    return broker


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "Traceback" in line or " ERROR " in line or '"level": "error"' in line
            or '"level": "critical"' in line]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_to_the_whole_group_stops_the_broker_cleanly_with_a_final_snapshot(tmp_path, signum) -> None:
    broker = start_in_own_group(BrokerProcess(tmp_path / "data", {}))
    try:
        with broker.client() as client:
            ids = [client.submit("job", b"x", queue="q").task_id for _ in range(5)]
        assert broker.proc is not None
        os.killpg(broker.proc.pid, signum)
        status = broker.proc.wait(timeout=30)
        log = broker.log()
        assert status == 0, log
        assert error_lines(log) == [], log
        assert "snapshot of 5 live tasks written" in log, log
        assert "tqbroker stopped" in log, log

        before = len(broker.log())
        broker.restart()
        with broker.client() as client:  # the first reply comes after recovery

            assert [client.status(task_id).state for task_id in ids] == ["pending"] * 5
        assert ", 0 WAL records replayed" in broker.log()[before:], broker.log()
    finally:
        broker.stop()
