"""Prometheus metrics and the health endpoints, served on `monitoring.prometheus_port`.

The six seed names are a contract (tq_tasks_total, tq_tasks_pending, tq_tasks_in_progress,
tq_task_processing_duration_seconds, tq_workers_connected, tq_broker_queue_depth). Counters and
histograms move at the event, from the actor that owns the event, except `tq_tasks_submitted_total`:
the queue actor adds it up and publishes it on its 10 ms tick (see QueueActor._publish_submitted).
Gauges are set by the queue and registry actors on their maintenance timer, so a scrape never asks an
actor anything.
Label children are cached per queue: `.labels()` costs a dict lookup and a lock, too much per task.
Queue label values are bounded (`monitoring.max_queue_labels`): the first that many queue names seen
since start get their own series, later ones are counted under `queue="_other"`, so a client inventing
queue names cannot grow the scrape (or the caches here) without end. `tq_queue_pending` is rebuilt on
every gauge refresh, so a queue with no pending task leaves it then.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
PROCESSING_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
OTHER_QUEUES = "_other"  # the queue label of every queue past monitoring.max_queue_labels
DEFAULT_MAX_QUEUE_LABELS = 1000


class QueueLabels:
    """The queue label value of a queue name: its own for the first `cap` names, then OTHER_QUEUES."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.known: set[str] = set()

    def __call__(self, queue: str) -> str:
        if queue in self.known:
            return queue
        if len(self.known) < self.cap:
            self.known.add(queue)
            return queue
        return OTHER_QUEUES


class BrokerMetrics:
    def __init__(self, max_queue_labels: int = DEFAULT_MAX_QUEUE_LABELS) -> None:
        self.queue_label = QueueLabels(max_queue_labels)
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.tasks_total = Counter("tq_tasks", "Tasks that reached a terminal state", ["queue", "outcome"], registry=r)
        self.tasks_pending = Gauge("tq_tasks_pending", "Tasks waiting to be claimed (all queues)", registry=r)
        self.tasks_in_progress = Gauge("tq_tasks_in_progress", "Tasks running under a lease", registry=r)
        self.processing = Histogram("tq_task_processing_duration_seconds", "Claim to RESULT, per run",
                                    ["queue"], buckets=PROCESSING_BUCKETS, registry=r)
        self.workers_connected = Gauge("tq_workers_connected", "Workers alive (heartbeating)", registry=r)
        self.queue_depth = Gauge("tq_broker_queue_depth", "Pending tasks by priority tier", ["priority"],
                                 registry=r)
        self.pending_payload_bytes = Gauge("tq_pending_payload_bytes", "Payload bytes of live tasks (pending, "
                                           "scheduled, running); bounded by broker.max_pending_bytes", registry=r)
        self.tasks_scheduled = Gauge("tq_tasks_scheduled", "Tasks waiting for their run_at", registry=r)
        self.queue_pending = Gauge("tq_queue_pending", "Pending tasks per queue", ["queue"], registry=r)
        self.submitted = Counter("tq_tasks_submitted", "Tasks accepted by SUBMIT/SUBMIT_BATCH", ["queue"],
                                 registry=r)
        self.retried = Counter("tq_tasks_retried", "Runs that ended without success and were retried",
                               registry=r)
        self.leases_expired = Counter("tq_leases_expired", "Leases that ran out before a RESULT", registry=r)
        self.workers_dead = Counter("tq_workers_dead", "Workers declared dead for missing heartbeats",
                                    registry=r)
        self.claim_wait = Histogram("tq_claim_wait_seconds", "From claimable (run_at) to claimed",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.wal_fsync = Histogram("tq_wal_fsync_duration_seconds", "Duration of one WAL fsync",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.connections = Gauge("tq_connections_open", "Open client connections", registry=r)
        self.errors = Counter("tq_errors", "ERROR replies sent, by code", ["code"], registry=r)
        self.backpressure = Counter("tq_backpressure_refusals", "SUBMITs refused with QUEUE_FULL", registry=r)
        self.history_backlog = Gauge("tq_history_backlog", "Finished tasks not yet written to DuckDB",
                                     registry=r)
        self.auth_failures = Counter("tq_auth_failures", "HELLOs refused for a missing or wrong api_key", registry=r)
        self.frame_budget_refusals = Counter("tq_frame_budget_refusals", "Frames refused because "
                                             "broker.max_inflight_frame_bytes stayed in use", registry=r)
        self.frame_budget_reserved = Gauge("tq_frame_budget_reserved_bytes", "Bytes reserved by frames "
                                           "being received (broker.max_inflight_frame_bytes)", registry=r)
        self.connections_evicted = Counter("tq_connections_evicted", "Unauthenticated connections closed to "
                                           "make room at broker.max_connections", registry=r)
        self.connection_deadlines = Counter("tq_connection_deadlines", "Connections closed for missing a "
                                            "deadline", ["deadline"], registry=r)  # hello | frame
        # queue operations (docs/protocol.md "Version 1.1")
        self.queue_paused = Gauge("tq_queue_paused", "1 while the queue is paused", ["queue"], registry=r)
        self.claims_throttled = Counter("tq_claims_throttled", "Claims that got fewer tasks (or waited) "
                                        "because of a queue's rate limit", registry=r)
        self.dead_evicted = Counter("tq_dead_evicted", "Dead tasks dropped past the dead set's bounds",
                                    registry=r)
        self._submitted: dict[str, Any] = {}
        self._finished: dict[tuple[str, str], Any] = {}
        self._processing: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}

    # ------------------------------------------------------------ events (cached label children)

    def count_submitted(self, queue: str, n: int = 1) -> None:
        label = self.queue_label(queue)
        child = self._submitted.get(label)
        if child is None:
            child = self._submitted[label] = self.submitted.labels(label)
        child.inc(n)

    def count_finished(self, queue: str, outcome: str) -> None:
        key = (self.queue_label(queue), outcome)
        child = self._finished.get(key)
        if child is None:
            child = self._finished[key] = self.tasks_total.labels(*key)
        child.inc()

    def observe_processing(self, queue: str, seconds: float) -> None:
        label = self.queue_label(queue)
        child = self._processing.get(label)
        if child is None:
            child = self._processing[label] = self.processing.labels(label)
        child.observe(seconds)

    def count_errors(self, codes: Iterable[str]) -> None:
        for code in codes:
            child = self._errors.get(code)
            if child is None:
                child = self._errors[code] = self.errors.labels(code)
            child.inc()

    def set_queue_paused(self, queue: str, paused: bool) -> None:
        self.queue_paused.labels(queue).set(1 if paused else 0)

    # ------------------------------------------------------------ gauges (maintenance timer)

    def set_queue_gauges(self, pending: int, running: int, scheduled: int, tiers: dict[str, int],
                         per_queue: dict[str, int], history_backlog: int) -> None:
        self.tasks_pending.set(pending)
        self.tasks_in_progress.set(running)
        self.tasks_scheduled.set(scheduled)
        for tier in ("high", "normal", "low"):
            self.queue_depth.labels(tier).set(tiers.get(tier, 0))
        by_label: dict[str, int] = {}
        for queue, count in per_queue.items():
            label = self.queue_label(queue)
            by_label[label] = by_label.get(label, 0) + count
        self.queue_pending.clear()
        for label, count in by_label.items():
            self.queue_pending.labels(label).set(count)
        self.history_backlog.set(history_backlog)


def health_app(metrics: BrokerMetrics, readiness: Callable[[], tuple[bool, dict[str, Any]]],
               guard: Callable[[dict[str, Any]], Any] | None = None) -> Callable:
    """A WSGI app: /metrics (Prometheus text), /healthz (process alive), /readyz (ready to serve).

    `guard(environ)` (actors.http_guard) returns (status, headers, message) for a request it refuses."""

    def app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        refusal = guard(environ) if guard is not None else None
        if refusal is not None:
            status, headers, message = refusal
            return _json(start_response, status, {"error": message}, headers)
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [generate_latest(metrics.registry)]
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            ready, details = readiness()
            return _json(start_response, "200 OK" if ready else "503 Service Unavailable",
                         {"status": "ready" if ready else "not ready", **details})
        return _json(start_response, "404 Not Found", {"error": f"no such path {path}",
                                                       "paths": ["/metrics", "/healthz", "/readyz"]})

    return app


def _json(start_response: Callable, status: str, body: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                            *(headers or [])])
    return [data]
