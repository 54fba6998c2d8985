"""Prometheus metrics and the health endpoints on monitoring.prometheus_port, against a real broker.

The six seed names are a contract (dashboards and alerts are built on them): their type, their labels,
and that they move with traffic. Gauges refresh on broker.maintenance_interval_secs, set to 0.2 s here,
so every check polls with a deadline instead of sleeping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, BrokerProcess
from prometheus_client.parser import text_string_to_metric_families

from transport.errors import InternalError
from transport.messages import TaskSpec

FAST_GAUGES = {"TQ_BROKER__MAINTENANCE_INTERVAL_SECS": "0.2"}
SEED = {
    "tq_tasks": ("counter", {"queue", "outcome"}),
    "tq_tasks_pending": ("gauge", set()),
    "tq_tasks_in_progress": ("gauge", set()),
    "tq_task_processing_duration_seconds": ("histogram", {"queue"}),
    "tq_workers_connected": ("gauge", set()),
    "tq_broker_queue_depth": ("gauge", {"priority"}),
}
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ------------------------------------------------------------------ helpers


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET http://127.0.0.1:port/path; 4xx/5xx are answers, not errors."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def scrape(broker: BrokerProcess) -> tuple[dict[str, Any], Samples]:
    status, content_type, body = http_get(broker.metrics_port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """Polls `check` until it returns a truthy value; fails with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what} (last: {result!r})")
        time.sleep(0.05)


def metric_becomes(broker: BrokerProcess, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                   timeout: float = 5.0) -> Samples:
    """Waits until every (name, labels) in `expected` has exactly that value on /metrics."""
    last: dict[str, float] = {}

    def check() -> Samples | None:
        _, samples = scrape(broker)
        last.clear()
        for (name, labels), want in expected.items():
            got = value(samples, name, **dict(labels))
            if got != want:
                last[f"{name}{dict(labels)}"] = got
        return None if last else samples

    try:
        return eventually(check, timeout)
    except AssertionError:
        raise AssertionError(f"metrics did not reach {expected} within {timeout} s; differing: {last}") from None


def k(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@pytest.fixture(scope="module")
def mbroker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker for the read-mostly tests of this module; each test uses its own queue and worker."""
    broker = BrokerProcess(tmp_path_factory.mktemp("metrics") / "data", FAST_GAUGES)
    broker.start()
    yield broker
    broker.stop()


# ------------------------------------------------------------------ /metrics


def test_metrics_exposes_the_six_seed_names_with_their_types_and_labels(mbroker: BrokerProcess) -> None:
    c = mbroker.client()
    task = c.submit("seed.kind", b"x", queue="seed-q").task_id
    (a,) = c.claim("seed-w", ["seed-q"], wait_ms=1000)
    assert a.task_id == task
    c.complete("seed-w", task)
    c.deregister("seed-w")

    tiers = {("tq_broker_queue_depth", frozenset({("priority", p)})) for p in ("high", "normal", "low")}
    eventually(lambda: tiers <= scrape(mbroker)[1].keys(), what="the first gauge refresh")
    families, samples = scrape(mbroker)
    for name, (kind, labels) in SEED.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, f"{name} is a {families[name].type}, not a {kind}"
        label_sets = {frozenset(s.labels) - {"le"} for s in families[name].samples
                      if not s.name.endswith("_created")}
        assert label_sets == {frozenset(labels)}, f"{name} has labels {label_sets}, expected {labels}"
    assert value(samples, "tq_tasks_total", queue="seed-q", outcome="completed") == 1
    assert value(samples, "tq_task_processing_duration_seconds_count", queue="seed-q") == 1
    assert {dict(lbl)["priority"] for (n, lbl) in samples if n == "tq_broker_queue_depth"} == {"high", "normal", "low"}


def test_metrics_use_their_own_registry_without_process_or_python_collectors(mbroker: BrokerProcess) -> None:
    families, _ = scrape(mbroker)
    foreign = [name for name in families if not name.startswith("tq_")]
    assert foreign == [], f"/metrics carries metrics that are not the broker's: {foreign}"


def test_the_seed_metrics_move_with_traffic(mbroker: BrokerProcess) -> None:
    c = mbroker.client()
    q = "traffic-q"
    specs = [TaskSpec(kind="t", payload=b"p", queue=q, priority=p) for p in ["high", "high", "normal", 10, 20, 30]]
    ids = c.submit_batch(specs)
    metric_becomes(mbroker, {
        k("tq_tasks_pending"): 6, k("tq_broker_queue_depth", priority="high"): 2,
        k("tq_broker_queue_depth", priority="normal"): 1, k("tq_broker_queue_depth", priority="low"): 3,
        k("tq_tasks_in_progress"): 0,
    })

    claimed = c.claim("traffic-w", [q], max_tasks=2, wait_ms=1000)
    assert {a.priority for a in claimed} == {255}
    metric_becomes(mbroker, {
        k("tq_tasks_pending"): 4, k("tq_tasks_in_progress"): 2, k("tq_workers_connected"): 1,
        k("tq_broker_queue_depth", priority="high"): 0, k("tq_broker_queue_depth", priority="low"): 3,
    })

    c.complete("traffic-w", claimed[0].task_id, b"r")
    c.fail("traffic-w", claimed[1].task_id, "boom", retry=False)
    c.cancel(ids[-1])
    for a in c.claim("traffic-w", [q], max_tasks=10, wait_ms=1000):
        c.complete("traffic-w", a.task_id)
    c.deregister("traffic-w")
    samples = metric_becomes(mbroker, {
        k("tq_tasks_total", queue=q, outcome="completed"): 4, k("tq_tasks_total", queue=q, outcome="failed"): 1,
        k("tq_tasks_total", queue=q, outcome="cancelled"): 1, k("tq_tasks_pending"): 0,
        k("tq_tasks_in_progress"): 0, k("tq_workers_connected"): 0,
        k("tq_task_processing_duration_seconds_count", queue=q): 5,
        k("tq_tasks_submitted_total", queue=q): 6,
    })
    assert 0 < value(samples, "tq_task_processing_duration_seconds_sum", queue=q) < 60
    assert value(samples, "tq_task_processing_duration_seconds_bucket", queue=q, le="+Inf") == 5


def test_error_replies_are_counted_by_code(mbroker: BrokerProcess) -> None:
    _, before = scrape(mbroker)
    c = mbroker.client()
    for _ in range(3):
        with pytest.raises(Exception, match="NOT_FOUND"):
            c.status("no-such-task")
    metric_becomes(mbroker, {k("tq_errors_total", code="NOT_FOUND"): value(before, "tq_errors_total",
                                                                            code="NOT_FOUND") + 3})


def test_gauges_move_only_on_the_maintenance_timer_not_on_scrape(make_broker: Callable[..., BrokerProcess]) -> None:
    broker = make_broker(TQ_BROKER__MAINTENANCE_INTERVAL_SECS="3600")
    eventually(lambda: value(scrape(broker)[1], "tq_broker_queue_depth", priority="high") == 0
               and ("tq_broker_queue_depth", frozenset({("priority", "high")})) in scrape(broker)[1],
               what="the first gauge refresh, on the first tick after start")
    broker.client().submit_batch([TaskSpec(kind="t", queue="slow-q") for _ in range(5)])
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        _, samples = scrape(broker)
        assert value(samples, "tq_tasks_pending") == 0, "a scrape refreshed a gauge before the maintenance timer"
        time.sleep(0.1)
    assert value(samples, "tq_tasks_submitted_total", queue="slow-q") == 5  # counters move at the event


# ------------------------------------------------------------------ health


def test_healthz_and_readyz_answer_json_on_a_ready_broker(mbroker: BrokerProcess) -> None:
    status, content_type, body = http_get(mbroker.metrics_port, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"status": "ok"}
    status, content_type, body = http_get(mbroker.metrics_port, "/readyz")
    assert (status, content_type) == (200, "application/json")
    ready = json.loads(body)
    assert ready["status"] == "ready" and ready["listening"] is True and ready["wal_writable"] is True


def test_an_unknown_path_is_a_json_404_listing_the_endpoints(mbroker: BrokerProcess) -> None:
    status, content_type, body = http_get(mbroker.metrics_port, "/nope")
    assert (status, content_type) == (404, "application/json")
    assert set(json.loads(body)["paths"]) == {"/metrics", "/healthz", "/readyz"}


@pytest.mark.skipif(not hasattr(psutil, "RLIMIT_FSIZE"), reason="needs prlimit (Linux) to simulate a full disk")
def test_readyz_is_503_naming_the_wal_while_it_cannot_be_written_and_recovers_after(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    """A full disk, simulated with RLIMIT_FSIZE on the broker process (the WAL write fails with EFBIG)."""
    broker = make_broker(**FAST_GAUGES)
    assert broker.proc is not None
    proc = psutil.Process(broker.proc.pid)
    _, hard = proc.rlimit(psutil.RLIMIT_FSIZE)
    proc.rlimit(psutil.RLIMIT_FSIZE, (4 << 20, hard))
    c = broker.client()
    try:
        with pytest.raises(InternalError) as refused:
            for _ in range(200):  # 64 KiB each: the WAL segment passes 4 MiB well before 200
                c.submit("big", b"\0" * 65536, queue="full-q")
        assert "WAL" in refused.value.message and str(broker.data_dir.resolve()) in refused.value.message

        status, _, body = http_get(broker.metrics_port, "/readyz")
        details = json.loads(body)
        assert status == 503 and details["status"] == "not ready" and details["wal_writable"] is False
        assert "WAL" in details["error"]
        assert http_get(broker.metrics_port, "/healthz")[0] == 200  # alive, just not ready
        assert c.stats().pending > 0  # reads still work
    finally:
        proc.rlimit(psutil.RLIMIT_FSIZE, (hard, hard))

    eventually(lambda: _submit_ok(c), what="SUBMIT accepted once the disk takes writes again")
    assert http_get(broker.metrics_port, "/readyz")[0] == 200


def _submit_ok(c: Any) -> bool:
    try:
        c.submit("small", b"", queue="full-q")
        return True
    except InternalError:
        return False


def test_healthz_answers_promptly_and_readyz_says_503_while_the_broker_recovers(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    broker = make_broker(TQ_BROKER__QUEUE_DEPTH_THRESHOLD="1000000", TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS="3600")
    c = broker.client(timeout=60)
    for _ in range(10):
        c.submit_batch([TaskSpec(kind="r", payload=b"x" * 50) for _ in range(10_000)])
    broker.kill()  # no final snapshot: the restart replays 100,000 WAL records (about half a second)
    broker.close_clients()

    env = {key: v for key, v in os.environ.items() if not key.startswith("TQ_")}
    env.update(broker.env, PYTHONPATH=str(ROOT))
    log = open(broker.log_path, "ab")  # noqa: SIM115 - handed to the child
    broker.proc = subprocess.Popen([sys.executable, "-m", "actors"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    log.close()
    seen: list[tuple[str, str]] = []  # (healthz, readyz): a status, "refused" (not bound yet) or "timeout"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and broker.proc.poll() is None:
        seen.append((_probe(broker.metrics_port, "/healthz"), _probe(broker.metrics_port, "/readyz")))
        if seen[-1][1] == "200":
            break
        time.sleep(0.01)
    assert seen and seen[-1][1] == "200", f"never ready: {seen[-5:]}"
    assert not [s for s in seen if "timeout" in s], f"health endpoints stalled during recovery: {seen}"
    assert ("200", "503") in seen, f"no 503 from /readyz while recovering: {sorted(set(seen))}"


def _probe(port: int, path: str) -> str:
    try:
        return str(http_get(port, path, timeout=2.0)[0])
    except TimeoutError:
        return "timeout"
    except urllib.error.URLError as exc:
        return "timeout" if isinstance(exc.reason, TimeoutError) else "refused"
    except OSError:
        return "refused"


# ------------------------------------------------------------------ the Grafana dashboard


def test_the_grafana_dashboard_covers_the_required_panels(mbroker: BrokerProcess) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}
    joined = " ".join(exprs.values())
    for needed in ("rate(tq_tasks_total", "rate(tq_tasks_submitted_total", "tq_broker_queue_depth",
                   "tq_tasks_in_progress", "tq_workers_connected", "tq_errors_total",
                   "histogram_quantile(0.5, sum by (le) (rate(tq_task_processing_duration_seconds_bucket",
                   "histogram_quantile(0.95, sum by (le) (rate(tq_task_processing_duration_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(tq_task_processing_duration_seconds_bucket",
                   "tq_claim_wait_seconds_bucket", "histogram_quantile(0.99, sum by (le) (rate(tq_wal_fsync"):
        assert needed in joined, f"no panel queries {needed!r}"
    assert all(p.get("datasource") for p in panels), "every panel names its datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    c = mbroker.client()  # traffic, so that every labelled series the dashboard uses exists
    task = c.submit("dash", queue="dash-q").task_id
    c.claim("dash-w", ["dash-q"], wait_ms=1000)
    c.complete("dash-w", task)
    c.deregister("dash-w")
    with pytest.raises(Exception, match="NOT_FOUND"):
        c.status("no-such-task")
    families, samples = scrape(mbroker)
    exposed = {name for name, _ in samples}
    for name in set(re.findall(r"\btq_[a-z_]+", joined)):  # a family with no series yet counts too
        family = re.sub(r"_(bucket|total|count|sum)$", "", name)
        assert name in exposed or family in families, f"the dashboard queries {name}, which the broker lacks"


def test_dashboard_json_is_loadable_as_a_grafana_import() -> None:
    dashboard = json.loads(Path(DASHBOARD).read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert any(v["name"] == "DS_PROMETHEUS" for v in dashboard.get("__inputs", []))
