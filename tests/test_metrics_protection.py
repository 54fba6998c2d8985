"""/metrics is guarded and bounded.

The HTTP endpoints follow the protocol port's protected mode: a peer on another machine (here: this
machine's non-loopback address) is refused without auth, needs `Authorization: Bearer KEY` for /metrics
with auth on (the probes stay open), and is served with auth.allow_unauthenticated_remote. Queue label
values are capped at monitoring.max_queue_labels (+ "_other")."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import OTHER_QUEUES
from tests.conftest import BrokerProcess
from tests.helpers import non_loopback_ipv4, wait_for
from transport.messages import Cancel, Submit, TaskSpec

REMOTE = non_loopback_ipv4()
needs_remote = pytest.mark.skipif(REMOTE is None, reason="NO NON-LOOPBACK IPv4 ADDRESS ON THIS MACHINE: the "
                                                         "protected-mode HTTP tests cannot reach the broker "
                                                         "from outside loopback")


def get(host: str, port: int, path: str, token: str | None = None) -> int:
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def metrics_on_all_interfaces(make_broker, **env: str) -> BrokerProcess:  # type: ignore[no-untyped-def]
    """A ready broker whose HTTP server listens on every interface."""
    broker = make_broker(TQ_MONITORING__PROMETHEUS_HOST="0.0.0.0", **env)
    wait_for(lambda: get("127.0.0.1", broker.metrics_port, "/readyz") == 200)  # recovery ends after listen
    return broker


@needs_remote
def test_without_auth_a_remote_peer_is_refused_and_this_machine_is_served(make_broker) -> None:
    broker = metrics_on_all_interfaces(make_broker)
    assert [get(REMOTE, broker.metrics_port, p) for p in ("/metrics", "/readyz", "/healthz")] == [403] * 3
    assert [get("127.0.0.1", broker.metrics_port, p) for p in ("/metrics", "/readyz", "/healthz")] == [200] * 3
    assert "remote clients are refused (protected mode" in broker.log()


@needs_remote
def test_with_auth_a_remote_scrape_needs_a_bearer_key_and_the_probes_stay_open(make_broker) -> None:
    broker = metrics_on_all_interfaces(make_broker, TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS="k-one,s3cret-key")
    port = broker.metrics_port
    assert get(REMOTE, port, "/metrics") == 401
    assert get(REMOTE, port, "/metrics", token="wrong-key") == 401
    assert get(REMOTE, port, "/metrics", token="s3cret-key") == 200
    assert (get(REMOTE, port, "/readyz"), get(REMOTE, port, "/healthz")) == (200, 200)
    assert get("127.0.0.1", port, "/metrics") == 200
    log = broker.log()
    assert "need Authorization: Bearer <api key> for /metrics" in log
    assert "s3cret-key" not in log and "wrong-key" not in log


@needs_remote
def test_allowing_unauthenticated_remote_clients_opens_the_endpoints_to_them(make_broker) -> None:
    broker = metrics_on_all_interfaces(make_broker, TQ_AUTH__ALLOW_UNAUTHENTICATED_REMOTE="true")
    assert get(REMOTE, broker.metrics_port, "/metrics") == 200


def test_five_thousand_queue_names_leave_at_most_the_cap_plus_one_queue_label_values(make_broker) -> None:
    broker = make_broker(TQ_MONITORING__MAX_QUEUE_LABELS="100", TQ_BROKER__MAINTENANCE_INTERVAL_SECS="0.2")
    client = broker.client(timeout=30)
    for start in range(0, 5000, 1000):
        submitted = client.pipeline([Submit(id=0, task=TaskSpec(kind="job", queue=f"tenant-{n}"))
                                     for n in range(start, start + 1000)])
        client.pipeline([Cancel(id=0, task_id=s.task_id) for s in submitted[:-10]])  # 10 per 1,000 stay pending
    [job] = client.claim("w1", ["tenant-4999"])
    client.complete("w1", job.task_id)

    def scrape() -> dict[str, set[str]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics", timeout=5) as resp:
            families = text_string_to_metric_families(resp.read().decode())
        return {f.name: {s.labels["queue"] for s in f.samples if "queue" in s.labels} for f in families}

    def settled() -> dict[str, set[str]] | None:
        labels = scrape()
        return labels if len(labels.get("tq_queue_pending", ())) > 0 and labels.get("tq_tasks_submitted") else None

    labels = wait_for(settled)
    every_value = set().union(*labels.values())
    assert len(every_value) <= 101 and OTHER_QUEUES in every_value
    assert "_other" in labels["tq_tasks_submitted"] and "_other" in labels["tq_task_processing_duration_seconds"]
    assert labels["tq_queue_pending"] <= {f"tenant-{n}" for n in range(100)} | {OTHER_QUEUES}
