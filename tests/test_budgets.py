"""Byte budgets (issue 10 item 4): live payloads bounded by broker.max_pending_bytes, and a snapshot of
many large payloads written in slices.

Real brokers over real sockets with real DuckDB files (tests/conftest.py).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import pytest
from conftest import BrokerProcess
from helpers import wait_for

from transport import messages as m
from transport.errors import QueueFull

KIB = 1024
BUDGET = 1024 * KIB


def spec(size: int) -> m.TaskSpec:
    return m.TaskSpec(kind="budget.test", payload=b"p" * size)


def gauge(broker: BrokerProcess) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("tq_pending_payload_bytes "):
                return float(line.split()[1])
    return None


@pytest.fixture
def budget_broker(make_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return make_broker(TQ_BROKER__MAX_PENDING_BYTES=str(BUDGET), TQ_BROKER__MAINTENANCE_INTERVAL_SECS="0.1")


def test_a_submit_past_max_pending_bytes_is_queue_full_naming_the_setting(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    for _ in range(3):
        client.submit("budget.test", b"p" * (300 * KIB))
    with pytest.raises(QueueFull, match=r"broker\.max_pending_bytes \(1048576\)"):
        client.submit("budget.test", b"p" * (300 * KIB))
    assert client.stats().pending == 3
    assert wait_for(lambda: gauge(budget_broker) == 900 * KIB)


def test_a_batch_past_the_budget_is_refused_whole(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    client.submit("budget.test", b"p" * (900 * KIB))
    with pytest.raises(QueueFull, match="max_pending_bytes"):
        client.submit_batch([spec(10 * KIB) for _ in range(20)])
    assert client.stats().pending == 1
    client.submit_batch([spec(10 * KIB) for _ in range(5)])
    assert client.stats().pending == 6


def test_finished_tasks_give_their_bytes_back(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    client.submit("budget.test", b"p" * (600 * KIB))
    with pytest.raises(QueueFull):
        client.submit("budget.test", b"p" * (600 * KIB))
    [assignment] = client.claim("w-budget", ["default"])
    with pytest.raises(QueueFull):  # running tasks still hold their payload
        client.submit("budget.test", b"p" * (600 * KIB))
    client.complete("w-budget", assignment.task_id, b"")
    client.submit("budget.test", b"p" * (600 * KIB))


def test_recovered_tasks_count_against_the_budget(budget_broker: BrokerProcess) -> None:
    client = budget_broker.client()
    client.submit("budget.test", b"p" * (700 * KIB))
    client = budget_broker.restart().client()
    with pytest.raises(QueueFull, match="max_pending_bytes"):
        client.submit("budget.test", b"p" * (400 * KIB))
    client.submit("budget.test", b"p" * (300 * KIB))
