"""What a new user hits first, through the real `tqbroker` console script and real brokers: the help
lists every command, a mistyped command gets a suggestion, `sql --data-dir` reads a stopped broker's
history from anywhere, `submit` says when nobody serves the queue, and the operator commands run
without gevent's monkey patching (the broker and the worker run with it)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.cli import build_parser
from actors.main import broker_parser, command_lines
from actors.worker.runner import parser as worker_parser
from tests.conftest import ROOT, BrokerProcess, free_port
from tests.helpers import wait_for

TQBROKER = Path(sys.executable).with_name("tqbroker")


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`tqbroker ARGS` as a user runs it: the installed console script, no TQ_* settings but `env`."""
    assert TQBROKER.exists(), f"{TQBROKER} is missing: reinstall with `pip install -e .` (make .venv/.installed)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TQ_") and k != "PYTHONPATH"}
    return subprocess.run([str(TQBROKER), *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=60)


def test_tqbroker_help_lists_every_command_with_one_line_each() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    names = [name for name, _ in command_lines()]
    assert {"worker", "stats", "workers", "status", "cancel", "submit", "sql"} <= set(names)
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and line.split()
              and line.split()[0] in names]
    assert listed == names
    assert "usage: tqbroker" in done.stdout and "python -m actors" in done.stdout


def test_a_mistyped_command_suggests_the_closest_and_lists_them_all_with_status_2() -> None:
    done = run("stat")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("tqbroker: unknown command 'stat'; did you mean 'stats'? commands: worker, ")
    assert all(name in done.stderr for name, _ in command_lines())


def test_broker_flags_still_reach_the_broker_parser() -> None:
    done = run("--port", "notaport")
    assert done.returncode == 2 and "--port: invalid int value" in done.stderr


def _all_parsers() -> list[argparse.ArgumentParser]:
    cli = build_parser()
    subs = next(a for a in cli._actions if isinstance(a, argparse._SubParsersAction))
    return [broker_parser(), worker_parser(), cli, *subs.choices.values()]


def test_every_positional_argument_and_flag_has_a_help_text() -> None:
    missing = [f"{p.prog}: {a.dest}" for p in _all_parsers() for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert missing == []


def _patched_after(*args: str) -> str:
    """Runs the console script's entry in a child for `args`; returns whether gevent had patched socket."""
    probe = ("import atexit, sys\n"
             "from gevent import monkey\n"
             "atexit.register(lambda: print('PATCHED' if monkey.is_module_patched('socket') else 'PLAIN',"
             " file=sys.stderr))\n"
             f"sys.argv = ['tqbroker', *{list(args)!r}]\n"
             "from actors.__main__ import run\n"
             "run()\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("TQ_")})
    return done.stderr.strip().splitlines()[-1]


def test_operator_commands_run_without_monkey_patching_and_the_worker_with_it() -> None:
    assert _patched_after("stats", "--port", str(free_port())) == "PLAIN"
    assert _patched_after("worker", "--help") == "PATCHED"


def _finished_task(broker: BrokerProcess) -> str:
    client = broker.client()
    task_id = client.submit("report", b"", queue="q").task_id
    [job] = client.claim("w-1", ["q"], max_tasks=1, wait_ms=1000)
    client.complete("w-1", job.task_id, result=b"ok")
    wait_for(lambda: client.query(f"SELECT 1 FROM task_history WHERE task_id = '{task_id}'")[1])
    return task_id


def test_sql_reads_a_stopped_brokers_history_from_another_directory_with_data_dir(
        make_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker()
    task_id = _finished_task(broker)
    broker.close_clients()
    assert broker.terminate() == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    query = "SELECT task_id, state FROM task_history"
    port = str(free_port())  # nobody listens: the CLI falls back to the history file

    done = run("sql", query, "--port", port, "--data-dir", str(broker.data_dir), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert task_id in done.stdout and "completed" in done.stdout

    missing = run("sql", query, "--port", port, cwd=elsewhere)
    assert missing.returncode == 1
    assert f"no history database at {elsewhere / 'data'}" in missing.stderr
    assert "--data-dir" in missing.stderr and "TQ_PERSISTENCE__DATA_DIR" in missing.stderr


def test_submit_warns_when_no_live_worker_serves_the_queue_and_still_succeeds(
        broker: BrokerProcess) -> None:
    env = {"TQ_BROKER__PORT": str(broker.port)}
    unserved = run("submit", "resize", "--queue", "media", env=env)
    assert unserved.returncode == 0 and "task_id:" in unserved.stdout
    assert "warning: no live worker is registered for queue 'media'" in unserved.stderr

    client = broker.client()
    client.register("w-media", name="media-worker", queues=["media"])
    served = run("submit", "resize", "--queue", "media", env=env)
    assert served.returncode == 0 and served.stderr == ""


@pytest.mark.parametrize("cause", ["busy port", "unreadable TLS certificate"])
def test_a_failed_start_leaves_no_data_directory_it_created(tmp_path: Path, cause: str) -> None:
    import socket

    data_dir = tmp_path / "fresh" / "nested" / "data"
    env = {"TQ_PERSISTENCE__DATA_DIR": str(data_dir), "TQ_MONITORING__PROMETHEUS_PORT": "0", "TQ_API__REST_PORT": "0",
           "TQ_BROKER__HOST": "127.0.0.1"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if cause == "busy port":
            env["TQ_BROKER__PORT"] = str(busy.getsockname()[1])
        else:
            env.update({"TQ_BROKER__PORT": str(free_port()), "TQ_API__ENABLE_TLS": "true",
                        "TQ_API__TLS_CERT_PATH": str(tmp_path / "no-cert.pem"),
                        "TQ_API__TLS_KEY_PATH": str(tmp_path / "no-key.pem")})
        done = run(env=env)
    assert done.returncode == 1, done.stderr
    assert not (tmp_path / "fresh").exists()


def test_a_failed_start_keeps_a_data_directory_that_already_existed(tmp_path: Path) -> None:
    import socket

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run(env={"TQ_PERSISTENCE__DATA_DIR": str(data_dir), "TQ_MONITORING__PROMETHEUS_PORT": "0",
                        "TQ_API__REST_PORT": "0",
                        "TQ_BROKER__HOST": "127.0.0.1", "TQ_BROKER__PORT": str(busy.getsockname()[1])})
    assert done.returncode == 1
    assert data_dir.is_dir()
