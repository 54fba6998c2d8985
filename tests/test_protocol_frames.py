"""Protocol conformance, part 1: framing and error paths, over raw sockets (docs/protocol.md "Frames").

Written from docs/protocol.md alone, the way an independent client author would test a broker: every frame
here is built by hand (`struct` + MessagePack), so nothing relies on the Python client's own encoding.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import BrokerProcess
from helpers import RawConn as SharedRawConn

from transport.frames import decode_response

HEADER = struct.Struct(">IB")
ERROR = 0x7F
OK, SUBMITTED, ASSIGNED, TASK_STATUS, STATS_REPLY = 0x40, 0x42, 0x44, 0x47, 0x49
HELLO, SUBMIT, CLAIM, STATUS, STATS = 0x01, 0x02, 0x04, 0x07, 0x09
MAX_FRAME_BYTES = 4096


def pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def frame(type_byte: int, payload: bytes) -> bytes:
    """One frame: length (type byte + payload), type, payload."""
    return HEADER.pack(len(payload) + 1, type_byte) + payload


def request(type_byte: int, **fields: Any) -> bytes:
    return frame(type_byte, pack(fields))


class RawConn(SharedRawConn):
    """The shared raw connection, checking every reply is a map and a well-formed response of its type."""

    def recv_frame(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        type_byte, payload = self.recv_raw(timeout)
        body = msgspec.msgpack.decode(payload)
        assert isinstance(body, dict), f"response payload is not a map: {body!r}"
        decode_response(type_byte, payload)  # also a well-formed response of its type
        return type_byte, body

    def recv_frames(self, count: int, timeout: float = 5.0) -> list[tuple[int, dict[str, Any]]]:
        return [self.recv_frame(timeout) for _ in range(count)]

    def call(self, type_byte: int, **fields: Any) -> tuple[int, dict[str, Any]]:
        self.send(request(type_byte, **fields))
        return self.recv_frame()

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """Whether the broker closes the connection within `timeout` (any unread frames are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def still_open(self) -> bool:
        """The connection still answers a request (STATS) after whatever came before."""
        kind, body = self.call(STATS, id=4242)
        return kind == STATS_REPLY and body["id"] == 4242

    def close(self) -> None:
        self.sock.close()


def start_broker(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> BrokerProcess:
    data_dir: Path = tmp_path_factory.mktemp(name) / "data"
    return BrokerProcess(data_dir, env).start()


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = start_broker(tmp_path_factory, "frames")
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def small_frame_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = start_broker(tmp_path_factory, "small-frames", TQ_BROKER__MAX_FRAME_BYTES=str(MAX_FRAME_BYTES))
    yield broker
    broker.stop()


@pytest.fixture
def conn(shared_broker: BrokerProcess) -> Iterator[RawConn]:
    raw = RawConn(shared_broker.port)
    yield raw
    raw.close()


def queue_name() -> str:
    return f"frames-{uuid.uuid4().hex[:12]}"


def submit_frame(request_id: int, **task: Any) -> bytes:
    return request(SUBMIT, id=request_id, task={"kind": "frames.test", **task})


# ---------------------------------------------------------------- framing violations that close


def test_a_frame_of_length_zero_is_answered_bad_frame_with_id_0_and_the_connection_is_closed(
    conn: RawConn,
) -> None:
    conn.send(b"\x00\x00\x00\x00")
    kind, body = conn.recv_frame()
    assert kind == ERROR
    assert body["code"] == "BAD_FRAME"
    assert body["id"] == 0
    assert isinstance(body["message"], str) and body["message"]
    assert conn.closed_by_peer()


def test_a_frame_over_max_frame_bytes_is_refused_and_closed_without_reading_its_body(
    small_frame_broker: BrokerProcess,
) -> None:
    raw = RawConn(small_frame_broker.port)
    try:
        # Announce one byte more than the limit but send only the header and a few body bytes: a broker
        # that waited for the body would never answer.
        raw.send(HEADER.pack(MAX_FRAME_BYTES + 1, SUBMIT) + b"\x82\xa2id")
        started = time.monotonic()
        kind, body = raw.recv_frame(timeout=3.0)
        assert kind == ERROR
        assert body["code"] == "FRAME_TOO_LARGE"
        assert body["id"] == 0
        assert raw.closed_by_peer(timeout=3.0)
        assert time.monotonic() - started < 3.0
    finally:
        raw.close()


def test_a_huge_announced_length_is_refused_at_once(small_frame_broker: BrokerProcess) -> None:
    raw = RawConn(small_frame_broker.port)
    try:
        raw.send(HEADER.pack(0xFFFF_FFFF, SUBMIT))
        kind, body = raw.recv_frame(timeout=3.0)
        assert (kind, body["code"], body["id"]) == (ERROR, "FRAME_TOO_LARGE", 0)
        assert raw.closed_by_peer()
    finally:
        raw.close()


def test_a_frame_of_exactly_max_frame_bytes_is_accepted(small_frame_broker: BrokerProcess) -> None:
    queue = queue_name()
    head = request(SUBMIT, id=11, task={"kind": "frames.test", "payload": b"", "queue": queue})
    # A bin8/bin16 header grows with the payload; find the payload size that makes `length` exactly the limit.
    size = MAX_FRAME_BYTES - len(head)
    for _ in range(10):
        data = request(SUBMIT, id=11, task={"kind": "frames.test", "payload": b"x" * size, "queue": queue})
        length = len(data) - 4
        if length == MAX_FRAME_BYTES:
            break
        size += MAX_FRAME_BYTES - length
    assert len(data) - 4 == MAX_FRAME_BYTES
    raw = RawConn(small_frame_broker.port)
    try:
        raw.send(data)
        kind, body = raw.recv_frame()
        assert kind == SUBMITTED, body
        assert body["id"] == 11
    finally:
        raw.close()


# ---------------------------------------------------------------- unknown types: answered, connection stays


def test_an_unknown_type_byte_is_answered_unknown_type_echoing_the_id_and_the_connection_stays_open(
    conn: RawConn,
) -> None:
    kind, body = conn.call(0x30, id=77, whatever=1)
    assert kind == ERROR
    assert body["code"] == "UNKNOWN_TYPE"
    assert body["id"] == 77
    assert conn.still_open()


@pytest.mark.parametrize("type_byte", [0x00, 0x0E, 0x3F, 0x40, 0x41, 0x7F, 0x80, 0xFF])
def test_every_type_byte_outside_the_v1_requests_is_answered_unknown_type(
    conn: RawConn, type_byte: int,
) -> None:
    kind, body = conn.call(type_byte, id=1000 + type_byte)
    assert (kind, body["code"], body["id"]) == (ERROR, "UNKNOWN_TYPE", 1000 + type_byte)
    assert conn.still_open()


def test_an_unknown_type_byte_without_a_usable_id_is_answered_with_id_0(conn: RawConn) -> None:
    conn.send(frame(0x31, b"\xc1\xc1"))
    kind, body = conn.recv_frame()
    assert (kind, body["code"], body["id"]) == (ERROR, "UNKNOWN_TYPE", 0)
    conn.send(frame(0x31, pack({"no_id": True})))
    kind, body = conn.recv_frame()
    assert (kind, body["code"], body["id"]) == (ERROR, "UNKNOWN_TYPE", 0)
    assert conn.still_open()


# ---------------------------------------------------------------- bad payloads: BAD_REQUEST, connection stays


def test_a_payload_that_is_not_msgpack_is_answered_bad_request_and_the_connection_stays_open(
    conn: RawConn,
) -> None:
    conn.send(frame(STATS, b"\xc1"))
    kind, body = conn.recv_frame()
    assert (kind, body["code"], body["id"]) == (ERROR, "BAD_REQUEST", 0)
    assert conn.still_open()


def test_an_empty_payload_is_answered_bad_request_and_the_connection_stays_open(conn: RawConn) -> None:
    conn.send(frame(STATS, b""))
    kind, body = conn.recv_frame()
    assert (kind, body["code"]) == (ERROR, "BAD_REQUEST")
    assert conn.still_open()


@pytest.mark.parametrize("payload", [[1, 2], "text", 42, None, b"bytes"],
                         ids=["array", "str", "int", "nil", "bin"])
def test_a_payload_that_is_not_a_map_is_answered_bad_request_and_the_connection_stays_open(
    conn: RawConn, payload: Any,
) -> None:
    conn.send(frame(STATS, pack(payload)))
    kind, body = conn.recv_frame()
    assert (kind, body["code"], body["id"]) == (ERROR, "BAD_REQUEST", 0)
    assert "map" in body["message"].lower()
    assert conn.still_open()


BAD_FIELDS = [
    # (type byte, payload, the field the message must name)
    (SUBMIT, {"id": 21}, "task"),
    (SUBMIT, {"id": 21, "task": {}}, "kind"),
    (SUBMIT, {"id": 21, "task": {"kind": ""}}, "kind"),
    (SUBMIT, {"id": 21, "task": {"kind": "k" * 201}}, "kind"),
    (SUBMIT, {"id": 21, "task": {"kind": 5}}, "kind"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "priority": 256}}, "priority"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "priority": -1}}, "priority"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "priority": "urgent"}}, "priority"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "priority": 1.5}}, "priority"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "queue": ""}}, "queue"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "queue": "has space"}}, "queue"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "queue": "q" * 201}}, "queue"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "queue": "q\n"}}, "queue"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "queue": "caf\u00e9"}}, "queue"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "payload": 12}}, "payload"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "run_at": "soon"}}, "run_at"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "max_retries": 101}}, "max_retries"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "max_retries": -1}}, "max_retries"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "lease_ms": 99}}, "lease_ms"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "lease_ms": 86_400_001}}, "lease_ms"),
    (SUBMIT, {"id": 21, "task": {"kind": "k", "unique_key": 7}}, "unique_key"),
    (0x03, {"id": 21, "tasks": []}, "tasks"),
    (0x03, {"id": 21, "tasks": [{"kind": "k"}, {"kind": "k", "priority": 300}]}, "priority"),
    (CLAIM, {"id": 21, "queues": ["q"], "max_tasks": 1, "wait_ms": 0}, "worker_id"),
    (CLAIM, {"id": 21, "worker_id": "w", "queues": "q", "max_tasks": 1, "wait_ms": 0}, "queues"),
    (CLAIM, {"id": 21, "worker_id": "w", "queues": ["q"], "max_tasks": "1", "wait_ms": 0}, "max_tasks"),
    (CLAIM, {"id": 21, "worker_id": "w", "queues": ["q"], "max_tasks": 1}, "wait_ms"),
    (0x05, {"id": 21, "worker_id": "w", "task_id": "t", "ok": 1}, "ok"),
    (0x05, {"id": 21, "worker_id": "w", "task_id": "t"}, "ok"),
    (0x05, {"id": 21, "worker_id": "w", "task_id": "t", "ok": False, "retry": "no"}, "retry"),
    (0x06, {"id": 21, "worker_id": "w"}, "active"),
    (0x06, {"id": 21, "worker_id": "w", "active": [], "memory_bytes": -1}, "memory_bytes"),
    (STATUS, {"id": 21}, "task_id"),
    (STATUS, {"id": 21, "task_id": 12}, "task_id"),
    (0x08, {"id": 21, "task_id": None}, "task_id"),
    (0x0A, {"id": 21, "metadata": {"k": 1}}, "metadata"),
    (0x0A, {"id": 21, "pid": "one"}, "pid"),
    (0x0B, {"id": 21}, "worker_id"),
    (0x0D, {"id": 21}, "sql"),
    (HELLO, {"id": 21, "client": "raw"}, "protocol"),
]


@pytest.mark.parametrize(("type_byte", "payload", "field"), BAD_FIELDS,
                         ids=[f"0x{t:02X}-{f}-{i}" for i, (t, _, f) in enumerate(BAD_FIELDS)])
def test_a_missing_mistyped_or_out_of_range_field_is_answered_bad_request_naming_it(
    conn: RawConn, type_byte: int, payload: dict[str, Any], field: str,
) -> None:
    conn.send(frame(type_byte, pack(payload)))
    kind, body = conn.recv_frame()
    assert kind == ERROR, body
    assert body["code"] == "BAD_REQUEST"
    assert body["id"] == 21
    assert field in body["message"], f"message does not name {field!r}: {body['message']!r}"
    assert conn.still_open()


@pytest.mark.parametrize("bad_id", [-1, 2**32, "seven", 1.5])
def test_a_request_with_an_unusable_id_is_answered_bad_request_with_id_0(conn: RawConn, bad_id: Any) -> None:
    conn.send(frame(STATS, pack({"id": bad_id})))
    kind, body = conn.recv_frame()
    assert (kind, body["code"], body["id"]) == (ERROR, "BAD_REQUEST", 0)
    assert "id" in body["message"]
    assert conn.still_open()


@pytest.mark.parametrize("payload", [{}, {"x": 1}], ids=["empty-map", "other-keys"])
def test_a_request_without_an_id_is_answered_bad_request_with_id_0_naming_id(
    conn: RawConn, payload: dict[str, Any],
) -> None:
    conn.send(frame(STATS, pack(payload)))
    kind, body = conn.recv_frame()
    assert (kind, body["code"], body["id"]) == (ERROR, "BAD_REQUEST", 0)
    assert "id" in body["message"]
    assert conn.still_open()


def test_float_fields_also_accept_msgpack_integers(conn: RawConn) -> None:
    # Many MessagePack encoders (JavaScript's among them) write a whole-number float as an integer.
    kind, body = conn.call(SUBMIT, id=51, task={"kind": "frames.test", "queue": queue_name(),
                                                "run_at": int(time.time()) - 10})
    assert (kind, body["id"]) == (SUBMITTED, 51), body
    kind, body = conn.call(0x06, id=52, worker_id="frames-int-" + uuid.uuid4().hex[:8], active=[],
                           cpu_percent=5, memory_bytes=10)
    assert (kind, body["id"]) == (OK, 52), body


def test_unknown_keys_are_ignored_at_every_level(conn: RawConn) -> None:
    queue = queue_name()
    conn.send(request(SUBMIT, id=31, future_field={"x": 1},
                      task={"kind": "frames.test", "queue": queue, "future_task_field": [1, 2, 3]}))
    kind, body = conn.recv_frame()
    assert kind == SUBMITTED, body
    assert body["id"] == 31
    kind, body = conn.call(STATUS, id=32, task_id=body["task_id"], extra=True)
    assert kind == TASK_STATUS, body
    assert body["task"]["queue"] == queue


# ---------------------------------------------------------------- stream handling, ids, pipelining


def test_requests_need_no_hello_without_auth(conn: RawConn) -> None:
    kind, body = conn.call(STATS, id=5)
    assert (kind, body["id"]) == (STATS_REPLY, 5)


def test_hello_is_answered_welcome_with_the_request_id(conn: RawConn) -> None:
    kind, body = conn.call(HELLO, id=9, client="raw-test", protocol=1)
    assert kind == 0x41, body
    assert body["id"] == 9
    assert body["protocol"] == 1
    assert isinstance(body["server"], str)
    assert isinstance(body["heartbeat_interval_ms"], int)
    assert isinstance(body["max_batch_claim"], int)


@pytest.mark.parametrize("request_id", [0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF])
def test_a_response_carries_the_request_id_over_the_whole_u32_range(conn: RawConn, request_id: int) -> None:
    kind, body = conn.call(STATS, id=request_id)
    assert (kind, body["id"]) == (STATS_REPLY, request_id)
    kind, body = conn.call(STATUS, id=request_id, task_id="no-such-task-" + uuid.uuid4().hex)
    assert (kind, body["code"], body["id"]) == (ERROR, "NOT_FOUND", request_id)


def test_many_frames_in_one_send_are_all_answered(conn: RawConn) -> None:
    queue = queue_name()
    data = b"".join(submit_frame(100 + i, queue=queue) for i in range(50))
    data += b"".join(request(STATS, id=200 + i) for i in range(20))
    conn.send(data)
    replies = conn.recv_frames(70)
    submitted = {body["id"]: body for kind, body in replies if kind == SUBMITTED}
    stats = {body["id"] for kind, body in replies if kind == STATS_REPLY}
    assert set(submitted) == set(range(100, 150))
    assert stats == set(range(200, 220))
    assert len({body["task_id"] for body in submitted.values()}) == 50


def test_one_frame_split_across_many_sends_is_reassembled(conn: RawConn) -> None:
    queue = queue_name()
    data = submit_frame(41, queue=queue, payload=b"split" * 20)
    for i in range(0, len(data), 3):
        conn.send(data[i : i + 3])
        time.sleep(0.002)  # lets each piece leave as its own segment
    kind, body = conn.recv_frame()
    assert (kind, body["id"]) == (SUBMITTED, 41)


def test_frames_split_at_arbitrary_points_including_mid_header_are_reassembled(conn: RawConn) -> None:
    data = b"".join(request(STATS, id=300 + i) for i in range(5))
    cuts = [1, 2, 5, 9, 17, 30, len(data) - 1]
    start = 0
    for cut in cuts:
        conn.send(data[start:cut])
        start = cut
        time.sleep(0.002)
    conn.send(data[start:])
    assert sorted(body["id"] for _, body in conn.recv_frames(5)) == list(range(300, 305))


def test_pipelined_requests_are_all_answered_and_a_waiting_claim_does_not_hold_up_later_ones(
    conn: RawConn,
) -> None:
    queue = queue_name()
    worker = "frames-w-" + uuid.uuid4().hex[:8]
    conn.send(request(CLAIM, id=500, worker_id=worker, queues=[queue], max_tasks=1, wait_ms=1500)
              + request(STATS, id=501)
              + request(STATUS, id=502, task_id="missing-" + uuid.uuid4().hex))
    first, second = conn.recv_frame(), conn.recv_frame()
    assert {first[1]["id"], second[1]["id"]} == {501, 502}
    kind, body = conn.recv_frame(timeout=5.0)
    assert (kind, body["id"], body["tasks"]) == (ASSIGNED, 500, [])


def test_a_valid_request_after_bad_ones_in_the_same_send_is_still_answered(conn: RawConn) -> None:
    conn.send(frame(STATS, b"\xc1") + request(0x33, id=61) + request(STATUS, id=62) + request(STATS, id=63))
    replies = conn.recv_frames(4)
    by_id: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for kind, body in replies:
        by_id.setdefault(body["id"], []).append((kind, body))
    assert [b["code"] for _, b in by_id[0]] == ["BAD_REQUEST"]
    assert by_id[61][0][1]["code"] == "UNKNOWN_TYPE"
    assert by_id[62][0][1]["code"] == "BAD_REQUEST"
    assert by_id[63][0][0] == STATS_REPLY
