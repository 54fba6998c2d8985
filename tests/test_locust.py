"""The Locust load test (loadtest/locustfile.py) runs headless against a real broker and reports no failures.

The locustfile is never imported here: importing locust monkey-patches the whole pytest process for gevent.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


@pytest.mark.timeout(60)
def test_headless_locust_run_submits_claims_and_completes_tasks_without_failures(make_broker, tmp_path) -> None:
    broker = make_broker()
    prefix = tmp_path / "locust"
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "6", "-r", "6", "-t", "4s",
         "--host", f"127.0.0.1:{broker.port}", "--csv", str(prefix), "--only-summary", "--stop-timeout", "2",
         "--priorities", "high:1,normal:2,low:1", "--batch", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=45,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, proc.stderr[-3000:]
    types = {kind for kind, _name in rows if kind}
    assert {"SUBMIT", "SUBMIT_BATCH", "CLAIM", "RESULT"} <= types, sorted(rows)
    stats = broker.client().stats()
    assert stats.completed_total > 0
