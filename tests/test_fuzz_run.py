"""A short run of the raw-socket fuzzer (`loadtest/fuzz.py`) against a real broker, as CI does it.

The fuzzer runs as users run it, `python -m loadtest.fuzz`, for ten seconds with a fixed seed; its JSON
summary says what was sent, what came back, and how the canary client fared. The broker must come out
correct (every canary check ok), alive, and still serving a fresh client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, BrokerProcess

FUZZ_SECONDS = 10
KINDS = {"random_bytes", "random_type", "mutated", "pipelined", "bitflip", "truncated", "zero_length", "oversize",
         "stalled_big", "abandoned"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, dict[str, Any], str]]:
    """One fuzz run shared by the tests below: (broker, JSON summary, printed summary)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = BrokerProcess(tmp / "data", {"TQ_MONITORING__JSON_LOGGING": "true"})
    broker.start()
    assert broker.proc is not None
    out = Path(tmp) / "summary.json"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.fuzz", "--host", "127.0.0.1", "--port", str(broker.port),
             "--seconds", str(FUZZ_SECONDS), "--pid", str(broker.proc.pid), "--seed", "20240611",
             "--workers", "3", "--stall-conns", "1", "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60,
        )
        assert out.exists(), f"the fuzzer wrote no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        summary = json.loads(out.read_text())
        summary["exit_status"] = done.returncode
        yield broker, summary, done.stdout + done.stderr
    finally:
        broker.stop()


def test_a_short_fuzz_run_leaves_the_canary_correct_and_the_broker_up(
    fuzzed: tuple[BrokerProcess, dict[str, Any], str],
) -> None:
    broker, s, printed = fuzzed
    assert s["exit_status"] == 0, printed
    assert s["canary_failed"] == 0 and s["canary_ok"] >= 10, printed
    assert s["broker_alive"] and broker.proc is not None and broker.proc.poll() is None
    with broker.client() as c:  # and it still serves a newcomer
        task = c.submit("after-fuzz", b"ok", queue="after-fuzz").task_id  # fuzz tasks sit in `default`
        (a,) = c.claim("after-fuzz-w", ["after-fuzz"], wait_ms=1000)
        c.complete("after-fuzz-w", a.task_id, b"done")
        assert a.task_id == task and c.status(task).state == "completed"


def test_the_fuzz_run_covered_every_kind_and_got_only_well_formed_answers(
    fuzzed: tuple[BrokerProcess, dict[str, Any], str],
) -> None:
    _, s, printed = fuzzed
    assert KINDS <= {kind for kind, n in s["frames_sent"].items() if n > 0}, s["frames_sent"]
    assert {"BAD_REQUEST", "UNKNOWN_TYPE", "BAD_FRAME", "FRAME_TOO_LARGE"} <= set(s["errors_by_code"])
    assert s["anomalies"] == {}, printed  # undecodable replies, INTERNAL errors, unanswered requests, ...
    for line in printed.splitlines()[:3]:
        assert line  # the human summary is printed too
    assert "canary checks:" in printed and "broker RSS:" in printed


def test_the_broker_rss_stays_bounded_under_fuzzing(fuzzed: tuple[BrokerProcess, dict[str, Any], str]) -> None:
    _, s, _ = fuzzed
    start, end, peak = s["rss_start_bytes"], s["rss_end_bytes"], s["rss_max_bytes"]
    assert start and end and peak
    assert peak < start + (512 << 20), f"RSS peaked {(peak - start) >> 20} MiB above its start"


def test_the_broker_log_stays_json_while_fuzzed(fuzzed: tuple[BrokerProcess, dict[str, Any], str]) -> None:
    broker, _, _ = fuzzed
    other = []
    for line in broker.log().splitlines():
        try:
            json.loads(line)
        except ValueError:
            other.append(line)
    assert other == [], "\n".join(other[:20])
