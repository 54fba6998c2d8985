"""The queue-operation CLI commands (`python -m actors pause ...`) against a real broker, as an operator
runs them: `--json` output, one-line errors, exit status 1 on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from conftest import ROOT, BrokerProcess

W = "worker-1"


def cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({"PYTHONPATH": str(ROOT), "TQ_BROKER__PORT": str(broker.port)})
    return subprocess.run([sys.executable, "-m", "actors", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def cli_json(broker: BrokerProcess, *args: str) -> Any:
    result = cli(broker, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pause_submit_claims_nothing_and_resume_makes_it_claimable(broker: BrokerProcess) -> None:
    c = broker.client()
    assert cli_json(broker, "pause", "media") == {"queue": "media", "done": "paused"}
    task_id = c.submit("k", b"", queue="media").task_id
    assert c.claim(W, ["media"], max_tasks=1, wait_ms=0) == []
    [row] = cli_json(broker, "queues")
    assert row["name"] == "media" and row["paused"] is True and row["pending"] == 1
    assert [t["task_id"] for t in cli_json(broker, "tasks", "--queue", "media", "--state", "pending")["tasks"]] == [
        task_id]
    cli_json(broker, "resume", "media")
    assert [j.task_id for j in c.claim(W, ["media"], max_tasks=1, wait_ms=0)] == [task_id]


def test_a_dead_task_shows_in_dead_and_requeue_task_id_makes_it_claimable_again(broker: BrokerProcess) -> None:
    c = broker.client()
    task_id = c.submit("k", b"", queue="q", max_retries=0).task_id
    c.claim(W, ["q"], max_tasks=1, wait_ms=1000)
    c.fail(W, task_id, "boom")
    page = cli_json(broker, "dead", "--queue", "q")
    assert [(t["task_id"], t["state"], t["error"]) for t in page["tasks"]] == [(task_id, "failed", "boom")]
    assert cli_json(broker, "requeue", task_id) == {"requeued": 1}
    assert [j.task_id for j in c.claim(W, ["q"], max_tasks=1, wait_ms=0)] == [task_id]


def test_purge_and_ratelimit_report_what_they_did(broker: BrokerProcess) -> None:
    c = broker.client()
    for _ in range(3):
        c.submit("k", b"", queue="q")
    assert cli_json(broker, "purge", "q") == {"queue": "q", "purged": 3}
    cli_json(broker, "ratelimit", "q", "25")
    assert cli_json(broker, "queues")[0]["rate_limit"] == 25
    cli_json(broker, "ratelimit", "q", "off")
    assert cli_json(broker, "queues") == []  # no tasks and default settings: nothing to list


def test_failures_are_one_error_line_and_exit_status_1(broker: BrokerProcess) -> None:
    result = cli(broker, "requeue", "no-such-task")
    assert result.returncode == 1
    assert result.stderr == "error: task no-such-task is not in the dead set (list it with `dead`)\n"
    result = cli(broker, "requeue")
    assert result.returncode == 1 and result.stderr.startswith("error: give either TASK_ID or --all")
