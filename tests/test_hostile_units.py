"""The pure pieces behind tests/test_hostile_connections.py, without a broker: the frame budget, the
QUERY gate, the rate-limited log and the frame reader's first-frame limit and announced length."""

from __future__ import annotations

import logging
import struct

import gevent
import gevent.event
import pytest

from actors.queries import QueryGate
from actors.ratelog import RateLimitedLog
from transport.budget import FrameBudget
from transport.frames import FrameError, FrameReader

HEADER = struct.Struct(">IB")


def test_a_reservation_that_does_not_fit_waits_and_is_granted_in_arrival_order() -> None:
    budget = FrameBudget(100)
    assert budget.try_reserve(80)
    order: list[str] = []
    first = gevent.spawn(lambda: budget.reserve(50, 5) and order.append("first"))
    second = gevent.spawn(lambda: budget.reserve(10, 5) and order.append("second"))
    gevent.sleep(0)  # both are waiting now; the second fits but must not overtake the first
    assert budget.waiting == 2 and budget.reserved == 80
    budget.release(80)
    gevent.joinall([first, second], timeout=5)
    assert order == ["first", "second"] and budget.reserved == 60


def test_a_reservation_that_never_fits_is_refused_at_once_and_a_timed_out_one_takes_nothing() -> None:
    budget = FrameBudget(100)
    assert not budget.reserve(101, 5)
    assert budget.try_reserve(100)
    assert not budget.reserve(1, 0.01)
    assert budget.waiting == 0 and budget.reserved == 100


def test_a_grant_that_lands_after_the_wait_timed_out_is_not_leaked(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = FrameBudget(100)
    assert budget.try_reserve(100)

    class RacingEvent:
        """wait() reports a timeout although the release (and so the grant) came first, as gevent's Event
        does when both happen in the same loop turn."""

        def set(self) -> None:
            pass

        def wait(self, timeout: float | None = None) -> bool:
            budget.release(100)
            return False

    monkeypatch.setattr(gevent.event, "Event", RacingEvent)
    assert budget.reserve(40, 1.0) is True
    assert budget.reserved == 40


def test_the_query_gate_runs_one_query_per_connection_while_others_wait() -> None:
    gate = QueryGate(2)
    hog, other = object(), object()
    started: list[str] = []
    release = gevent.event.Event()

    def run(conn: object, name: str) -> None:
        with gate.slot(conn):
            started.append(name)
            release.wait()

    greenlets = [gevent.spawn(run, hog, "hog-1"), gevent.spawn(run, hog, "hog-2"), gevent.spawn(run, other, "other")]
    gevent.sleep(0)
    assert started == ["hog-1", "other"] and gate.waiting == 1
    release.set()
    gevent.joinall(greenlets, timeout=5)
    assert started == ["hog-1", "other", "hog-2"] and gate.running == {}


def test_the_rate_limited_log_logs_a_burst_per_key_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("test.ratelog"), interval_s=3600, burst=1)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        results = [log.log(logging.WARNING, "10.0.0.1", "authentication failed") for _ in range(5)]
        log.log(logging.WARNING, "10.0.0.2", "authentication failed")
    assert results == [True, False, False, False, False]
    assert len(caplog.records) == 2
    log.interval_s = 0
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        log.log(logging.WARNING, "10.0.0.1", "authentication failed")
    assert "4 more like this suppressed before" in caplog.records[-1].getMessage()


def test_the_reader_announces_a_frames_length_once_its_header_is_in() -> None:
    reader = FrameReader(1 << 20)
    assert reader.feed(HEADER.pack(1000, 9)[:3]) == [] and reader.partial_length == 0
    assert reader.feed(HEADER.pack(1000, 9)[3:] + b"x" * 10) == []
    assert reader.partial_length == 1004 and reader.buffered == 15


def test_only_the_first_frame_is_held_to_the_first_frame_limit() -> None:
    reader = FrameReader(1 << 20, first_frame_limit=100, first_frame_limit_error=("UNAUTHORIZED", "{length}>{limit}"))
    small, big = HEADER.pack(5, 1) + b"abcd", HEADER.pack(500, 9) + bytes(499)
    assert len(reader.feed(small + big)) == 2
    fresh = FrameReader(1 << 20, first_frame_limit=100, first_frame_limit_error=("UNAUTHORIZED", "{length}>{limit}"))
    with pytest.raises(FrameError) as refused:
        fresh.feed(big[:5])
    assert refused.value.code == "UNAUTHORIZED" and refused.value.message == "500>100"
