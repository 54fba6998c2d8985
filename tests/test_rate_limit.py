"""Per-queue rate limits: the token bucket on its own (explicit time), then a real broker throttling
claims across several connections (no timing assertion: counts against the burst, and the metric)."""

from __future__ import annotations

import pytest
from conftest import BrokerProcess
from helpers import wait_for
from test_metrics_health import scrape, value

from actors.rate_limit import TokenBucket
from transport.errors import BadRequest
from transport.messages import TaskSpec

T0 = 1_000.0


# ------------------------------------------------------------------ the bucket


def test_a_new_bucket_allows_a_burst_of_its_rate_and_then_nothing() -> None:
    bucket = TokenBucket(10, T0)
    assert bucket.take(25, T0) == 10
    assert bucket.take(1, T0) == 0


def test_the_bucket_refills_at_its_rate_and_never_beyond_its_burst() -> None:
    bucket = TokenBucket(10, T0)
    bucket.take(10, T0)
    assert bucket.available(T0 + 0.25) == 2  # 2.5 tokens: whole ones only
    assert bucket.take(5, T0 + 0.25) == 2
    assert bucket.available(T0 + 100) == 10


def test_over_ten_seconds_a_bucket_hands_out_its_rate_times_ten_plus_the_burst() -> None:
    bucket, taken = TokenBucket(50, T0), 0
    for step in range(1001):  # every 10 ms, as the broker's tick
        taken += bucket.take(1000, T0 + step * 0.01)
    assert taken == 50 * 10 + 50


def test_a_rate_under_one_per_second_still_lets_one_through_and_then_waits() -> None:
    bucket = TokenBucket(0.5, T0)
    assert bucket.take(3, T0) == 1
    assert bucket.take(1, T0 + 1.0) == 0
    assert bucket.take(1, T0 + 2.0) == 1


def test_a_non_positive_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0, T0)


# ------------------------------------------------------------------ a broker


def test_claims_beyond_the_rate_get_fewer_tasks_and_are_counted_as_throttled(broker: BrokerProcess) -> None:
    c = broker.client()
    c.submit_batch([TaskSpec(kind="k", queue="slow") for _ in range(100)])
    c.rate_limit("slow", 5)
    workers = [broker.client() for _ in range(4)]
    first = [w.claim(f"w{i}", ["slow"], max_tasks=10, wait_ms=0) for i, w in enumerate(workers)]
    assert sum(len(got) for got in first) <= 5 + 1  # the burst (5), plus at most one token refilled meanwhile
    wait_for(lambda: value(scrape(broker)[1], "tq_claims_throttled_total") >= 1)
    assert [q.rate_limit for q in c.queues() if q.name == "slow"] == [5]


def test_a_long_poll_claim_on_a_throttled_queue_waits_for_the_next_token(broker: BrokerProcess) -> None:
    c = broker.client()
    c.submit_batch([TaskSpec(kind="k", queue="slow") for _ in range(3)])
    c.rate_limit("slow", 1)
    assert len(c.claim("w", ["slow"], max_tasks=3, wait_ms=0)) == 1
    assert len(c.claim("w", ["slow"], max_tasks=3, wait_ms=5_000)) == 1  # answered when a token came


def test_clearing_the_rate_limit_hands_out_everything_at_once(broker: BrokerProcess) -> None:
    c = broker.client()
    c.submit_batch([TaskSpec(kind="k", queue="slow") for _ in range(20)])
    c.rate_limit("slow", 1)
    c.rate_limit("slow", None)
    assert [len(c.claim("w", ["slow"], max_tasks=10, wait_ms=0)) for _ in range(2)] == [10, 10]
    assert [q.rate_limit for q in c.queues() if q.name == "slow"] == [None]


def test_a_rate_of_zero_is_a_bad_request_naming_the_field(broker: BrokerProcess) -> None:
    with pytest.raises(BadRequest, match="per_second"):
        broker.client().rate_limit("slow", 0)
