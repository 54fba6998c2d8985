"""The HTTP endpoints follow the protocol port's protected mode: a peer on another machine (here: this
machine's non-loopback address) is refused without auth, needs `Authorization: Bearer KEY` for /metrics
with auth on (the probes stay open), and is served with auth.allow_unauthenticated_remote."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import pytest

from tests.conftest import BrokerProcess
from tests.helpers import wait_for


def non_loopback_address() -> str | None:
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


REMOTE = non_loopback_address()
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
