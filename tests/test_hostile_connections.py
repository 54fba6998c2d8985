"""Hostile connections against real brokers: memory before authentication, slowloris, eviction at the
connection limit, failed-HELLO log floods and QUERY hogging (issue 10, items 2, 3 and part of 7).

Deadlines are set to a second or a few so the tests stay fast; the broker's sweeper looks at a
connection every 0.5 s, so a deadline closes it between the deadline and about a second later.
"""

from __future__ import annotations

import struct
import threading
import time
import urllib.request
from typing import Any

import msgspec
import pytest
from conftest import BrokerProcess
from helpers import RawConn, wait_for
from prometheus_client.parser import text_string_to_metric_families

from transport.client import Client

HEADER = struct.Struct(">IB")
KEY = "hostile-test-key"
HELLO, STATS, QUERY = 0x01, 0x09, 0x0D
ERROR, ROWS, WELCOME, STATS_REPLY = 0x7F, 0x4D, 0x41, 0x49
MAX_FRAME = 1_048_576
BIG = 1_000_000  # `length` of the big frames below: two of them do not fit in the 1.5 MiB budget


def frame(type_byte: int, **fields: Any) -> bytes:
    payload = msgspec.msgpack.encode(fields)
    return HEADER.pack(len(payload) + 1, type_byte) + payload


def big_stats(request_id: int, length: int = BIG) -> bytes:
    """A STATS frame whose `length` is exactly `length`, padded with an unknown (ignored) bin field."""
    base = len(msgspec.msgpack.encode({"id": request_id, "pad": b""}))
    payload = msgspec.msgpack.encode({"id": request_id, "pad": bytes(length - 1 - base - 3)})
    assert len(payload) + 1 == length
    return HEADER.pack(length, STATS) + payload


def metric(broker: BrokerProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def error_of(raw: RawConn) -> dict[str, Any]:
    type_byte, reply = raw.recv_frame()
    assert type_byte == ERROR, reply
    return reply


# ---------------------------------------------------------------- before authentication


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    broker = BrokerProcess(tmp_path_factory.mktemp("auth") / "data", {
        "TQ_AUTH__ENABLED": "true", "TQ_AUTH__API_KEYS": KEY, "TQ_AUTH__HELLO_TIMEOUT_SECS": "1.5",
        "TQ_BROKER__MAX_FRAME_BYTES": str(MAX_FRAME),
    }).start()
    yield broker
    broker.stop()


def test_a_first_frame_bigger_than_a_hello_is_refused_before_its_body_is_read(auth_broker: BrokerProcess) -> None:
    raw = RawConn(auth_broker.port)
    try:
        raw.send(HEADER.pack(500_000, STATS))  # the header of a big frame, no body
        reply = error_of(raw)
        assert reply["id"] == 0 and reply["code"] == "UNAUTHORIZED"
        assert "auth.max_hello_bytes (1024)" in reply["message"]
        assert raw.wait_closed(5.0) is not None
    finally:
        raw.close()
    assert metric(auth_broker, "tq_auth_failures_total") >= 1


def test_a_hello_pipelined_with_a_big_frame_is_served_whole(auth_broker: BrokerProcess) -> None:
    raw = RawConn(auth_broker.port)
    try:
        raw.send(frame(HELLO, id=1, client="t", protocol=1, api_key=KEY) + big_stats(2, 200_000))
        assert raw.recv_frame()[0] == WELCOME
        type_byte, reply = raw.recv_frame()
        assert type_byte == STATS_REPLY and reply["id"] == 2
    finally:
        raw.close()


def test_a_connection_that_dribbles_bytes_without_authenticating_is_closed_at_the_hello_deadline(
    auth_broker: BrokerProcess,
) -> None:
    raw = RawConn(auth_broker.port)
    hello = frame(HELLO, id=1, client="slow", protocol=1, api_key=KEY)
    try:
        started = time.monotonic()
        for byte in hello[:-1]:  # one byte every 0.2 s: each would reset an idle timer
            raw.send(bytes([byte]))
            if raw.wait_closed(0.2) is not None:
                break
        else:
            pytest.fail("a connection dribbling its HELLO stayed open past auth.hello_timeout_secs")
        assert time.monotonic() - started < 10
    finally:
        raw.close()
    wait_for(lambda: metric(auth_broker, "tq_connection_deadlines_total", deadline="hello") >= 1)


def test_a_silent_connection_is_told_why_it_is_closed_at_the_hello_deadline(auth_broker: BrokerProcess) -> None:
    raw = RawConn(auth_broker.port)
    try:
        assert raw.wait_closed(10.0) is not None
        reply = error_of(raw)
        assert reply["code"] == "UNAUTHORIZED" and "auth.hello_timeout_secs" in reply["message"]
    finally:
        raw.close()


def test_an_authenticated_client_outlives_the_hello_deadline(auth_broker: BrokerProcess) -> None:
    with Client("127.0.0.1", auth_broker.port, api_key=KEY) as client:
        client.stats()
        raw = RawConn(auth_broker.port)  # a silent neighbour: closed at the deadline, the client is not
        try:
            assert raw.wait_closed(10.0) is not None
        finally:
            raw.close()
        assert client.stats() is not None


def test_failed_hellos_are_counted_each_but_logged_at_most_ten_times_per_peer(auth_broker: BrokerProcess) -> None:
    before = metric(auth_broker, "tq_auth_failures_total")
    lines_before = auth_broker.log().count("authentication failed")
    for i in range(30):
        raw = RawConn(auth_broker.port)
        try:
            raw.send(frame(HELLO, id=i + 1, client="attacker", protocol=1, api_key="wrong-key-" + str(i)))
            assert error_of(raw)["code"] == "UNAUTHORIZED"
        finally:
            raw.close()
    wait_for(lambda: metric(auth_broker, "tq_auth_failures_total") >= before + 30)
    log = auth_broker.log()
    assert log.count("authentication failed") - lines_before <= 10
    assert "wrong-key" not in log


# ---------------------------------------------------------------- frame deadline and frame budget


@pytest.fixture(scope="module")
def budget_broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    broker = BrokerProcess(tmp_path_factory.mktemp("budget") / "data", {
        "TQ_BROKER__MAX_FRAME_BYTES": str(MAX_FRAME),
        "TQ_BROKER__MAX_INFLIGHT_FRAME_BYTES": str(MAX_FRAME * 3 // 2),
        "TQ_BROKER__FRAME_TIMEOUT_SECS": "3",
    }).start()
    yield broker
    broker.stop()


def test_a_frame_dribbled_byte_by_byte_is_closed_at_the_frame_deadline(budget_broker: BrokerProcess) -> None:
    raw = RawConn(budget_broker.port)
    data = frame(STATS, id=5, pad=bytes(100))
    try:
        for byte in data[:-1]:
            raw.send(bytes([byte]))
            if raw.wait_closed(0.2) is not None:
                break
        else:
            pytest.fail("a dribbled frame was never closed")
        reply = error_of(raw)
        assert reply["code"] == "BAD_FRAME" and "broker.frame_timeout_secs" in reply["message"]
    finally:
        raw.close()
    wait_for(lambda: metric(budget_broker, "tq_connection_deadlines_total", deadline="frame") >= 1)


def test_a_big_frame_waits_for_budget_and_goes_through_once_another_completes(
    budget_broker: BrokerProcess,
) -> None:
    holder, waiter = RawConn(budget_broker.port), RawConn(budget_broker.port)
    first, second = big_stats(11), big_stats(12)
    try:
        holder.send(first[: BIG // 2])
        wait_for(lambda: metric(budget_broker, "tq_frame_budget_reserved_bytes") >= BIG)
        sender = threading.Thread(target=waiter.send, args=(second,), daemon=True)
        sender.start()  # the broker reads its header, finds no room, and stops reading it
        with Client("127.0.0.1", budget_broker.port) as small:
            assert small.stats() is not None  # small requests are not held up meanwhile
        holder.send(first[BIG // 2 :])
        assert holder.recv_frame()[1]["id"] == 11
        type_byte, reply = waiter.recv_frame(timeout=10)
        assert type_byte == STATS_REPLY and reply["id"] == 12
        sender.join(5)
    finally:
        holder.close()
        waiter.close()
    wait_for(lambda: metric(budget_broker, "tq_frame_budget_reserved_bytes") == 0)


def test_a_big_frame_that_finds_no_budget_within_its_deadline_is_refused_and_counted(
    budget_broker: BrokerProcess,
) -> None:
    refusals = metric(budget_broker, "tq_frame_budget_refusals_total")
    waiter, holder = RawConn(budget_broker.port), RawConn(budget_broker.port)
    second = big_stats(22)
    try:
        waiter.send(second[:1])  # its frame (and deadline) starts first ...
        holder.send(big_stats(21)[: BIG // 2])  # ... so the holder is closed only after the waiter gave up
        wait_for(lambda: metric(budget_broker, "tq_frame_budget_reserved_bytes") >= BIG)
        waiter.send(second[1:5])
        reply = error_of(waiter)
        assert reply["id"] == 0 and reply["code"] == "QUEUE_FULL"
        assert "broker.max_inflight_frame_bytes" in reply["message"] and "retry" in reply["message"]
        assert waiter.wait_closed(5.0) is not None
    finally:
        waiter.close()
        holder.close()
    wait_for(lambda: metric(budget_broker, "tq_frame_budget_refusals_total") == refusals + 1)
    with Client("127.0.0.1", budget_broker.port) as client:
        assert client.stats() is not None
    assert "refusing a frame of" in budget_broker.log()


# ---------------------------------------------------------------- the connection limit


def test_at_the_limit_the_oldest_unauthenticated_connection_makes_room(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS=KEY, TQ_BROKER__MAX_CONNECTIONS="3")
    with Client("127.0.0.1", broker.port, api_key=KEY) as member:
        member.stats()
        oldest, newer = RawConn(broker.port), RawConn(broker.port)
        try:
            wait_for(lambda: metric(broker, "tq_connections_open") == 3)
            with Client("127.0.0.1", broker.port, api_key=KEY) as newcomer:
                assert newcomer.stats() is not None
                reply = error_of(oldest)
                assert reply["code"] == "TOO_MANY_CONNECTIONS" and "not authenticated" in reply["message"]
                assert newer.wait_closed(0.5) is None  # only one made room
                assert member.stats() is not None
        finally:
            oldest.close()
            newer.close()
    assert metric(broker, "tq_connections_evicted_total") == 1


def test_without_auth_a_connection_that_never_finished_a_frame_makes_room(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(TQ_BROKER__MAX_CONNECTIONS="2")
    with Client("127.0.0.1", broker.port) as member:
        member.stats()
        loris = RawConn(broker.port)
        try:
            loris.send(b"\x00")  # one byte of a header, then nothing
            wait_for(lambda: metric(broker, "tq_connections_open") == 2)
            with Client("127.0.0.1", broker.port) as newcomer:
                assert newcomer.stats() is not None
            assert loris.wait_closed(5.0) is not None
        finally:
            loris.close()


# ---------------------------------------------------------------- QUERY concurrency


@pytest.fixture(scope="module")
def query_broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    broker = BrokerProcess(tmp_path_factory.mktemp("query") / "data", {}).start()
    yield broker
    broker.stop()


SLOW_SQL = "SELECT sum(hash(range)) AS s FROM range(300000000)"


def test_a_third_query_in_flight_on_one_connection_is_refused_as_retryable(query_broker: BrokerProcess) -> None:
    raw = RawConn(query_broker.port)
    try:
        raw.send(b"".join(frame(QUERY, id=i, sql="SELECT 1") for i in (1, 2, 3)))
        replies = {}
        for _ in range(3):
            type_byte, reply = raw.recv_frame(timeout=30)
            replies[reply["id"]] = (type_byte, reply)
        assert replies[1][0] == ROWS and replies[2][0] == ROWS
        assert replies[3][0] == ERROR and replies[3][1]["code"] == "QUEUE_FULL"
        assert "api.max_queries_per_connection" in replies[3][1]["message"]
    finally:
        raw.close()


def test_a_quick_query_is_not_stuck_behind_two_slow_ones_of_another_client(query_broker: BrokerProcess) -> None:
    hog = RawConn(query_broker.port, timeout=60)
    try:
        hog.send(frame(QUERY, id=1, sql=SLOW_SQL) + frame(QUERY, id=2, sql=SLOW_SQL))
        with Client("127.0.0.1", query_broker.port, timeout=60) as other:
            other.stats()  # the hog's queries have been routed by now
            _, rows = other.query("SELECT 1 AS one")
            assert rows == [[1]]
        # the quick query came back while the hog's first slow query was still running
        assert not hog.frames
        hog.sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            hog.sock.recv(1, 0x02)  # MSG_PEEK: nothing answered to the hog yet
        answered = {hog.recv_frame(timeout=60)[1]["id"] for _ in range(2)}
        assert answered == {1, 2}
    finally:
        hog.close()
