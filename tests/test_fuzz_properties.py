"""Property tests of the frame decoder and of every request's validation (hypothesis, in-process).

The contract under test (docs/protocol.md "Frames"): whatever bytes arrive, the broker's decoding either
yields a typed request or a well-formed ERROR (BAD_FRAME / FRAME_TOO_LARGE for the framing, UNKNOWN_TYPE
/ BAD_REQUEST for a payload); no other exception escapes. Example counts are kept modest so the whole
file runs in a few seconds; `loadtest/fuzz.py` covers the same ground against a live broker.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from transport import messages_ops as ops
from transport.frames import (
    FrameError,
    FrameReader,
    decode_request,
    decode_response,
    encode_frame,
    encode_raw_frame,
    payload_id,
)
from transport.messages import (
    REQUEST_TYPES,
    RESPONSE_TYPES,
    Cancel,
    Claim,
    Deregister,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Message,
    Query,
    Register,
    Result,
    Stats,
    Status,
    Submit,
    SubmitBatch,
    TaskSpec,
    Workers,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}

# ------------------------------------------------------------------ strategies

u32 = st.integers(min_value=0, max_value=0xFFFF_FFFF)
mp_int = st.integers(min_value=-(2**63), max_value=2**64 - 1)
text200 = st.text(min_size=1, max_size=40)
queue_name = st.from_regex(r"\A[A-Za-z0-9_.:-]{1,40}\Z")
msgpack_scalar = st.none() | st.booleans() | mp_int | st.floats() | st.text(max_size=30) | st.binary(max_size=30)
msgpack_value = st.recursive(
    msgpack_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
finite = st.floats(allow_nan=False, allow_infinity=False)

task_spec = st.builds(
    TaskSpec,
    kind=text200,
    payload=st.binary(max_size=64),
    queue=queue_name,
    priority=st.integers(0, 255) | st.sampled_from(["high", "normal", "low"]),
    run_at=st.none() | st.floats(-62_135_596_800, 253_402_300_799),  # years 1-9999
    max_retries=st.none() | st.integers(0, 100),
    lease_ms=st.none() | st.integers(100, 86_400_000),
    unique_key=st.none() | st.text(min_size=1, max_size=40),
)

VALID: dict[type[Message], st.SearchStrategy[Any]] = {
    Hello: st.builds(Hello, id=u32, client=st.text(max_size=40), protocol=mp_int,
                     api_key=st.none() | st.text(max_size=60)),
    Submit: st.builds(Submit, id=u32, task=task_spec),
    SubmitBatch: st.builds(SubmitBatch, id=u32, tasks=st.lists(task_spec, min_size=1, max_size=4)),
    Claim: st.builds(Claim, id=u32, worker_id=text200, queues=st.lists(queue_name, min_size=1, max_size=4),
                     max_tasks=mp_int, wait_ms=mp_int),
    Result: st.builds(Result, id=u32, worker_id=text200, task_id=text200, ok=st.booleans(),
                      result=st.none() | st.binary(max_size=64), error=st.none() | st.text(max_size=60),
                      retry=st.booleans()),
    Heartbeat: st.builds(Heartbeat, id=u32, worker_id=text200, active=st.lists(text200, max_size=4),
                         cpu_percent=st.none() | finite, memory_bytes=st.none() | st.integers(0, 2**63)),
    Status: st.builds(Status, id=u32, task_id=text200),
    Cancel: st.builds(Cancel, id=u32, task_id=text200),
    Stats: st.builds(Stats, id=u32),
    Register: st.builds(
        Register, id=u32, worker_id=st.none() | text200, name=st.none() | st.text(max_size=40),
        hostname=st.none() | st.text(max_size=40), pid=st.none() | st.integers(0, 2**31),
        queues=st.none() | st.lists(queue_name, max_size=4), concurrency=st.none() | st.integers(0, 1_000_000),
        metadata=st.none() | st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4),
    ),
    Deregister: st.builds(Deregister, id=u32, worker_id=text200),
    Workers: st.builds(Workers, id=u32),
    Query: st.builds(Query, id=u32, sql=st.text(min_size=1, max_size=80)),
}
VALID.update({  # protocol 1.1: queue operations (transport/messages_ops.py)
    ops.Pause: st.builds(ops.Pause, id=u32, queue=queue_name),
    ops.Resume: st.builds(ops.Resume, id=u32, queue=queue_name),
    ops.RateLimit: st.builds(ops.RateLimit, id=u32, queue=queue_name,
                             per_second=st.none() | st.floats(0.001, 1_000_000)),
    ops.Purge: st.builds(ops.Purge, id=u32, queue=queue_name, scheduled=st.booleans()),
    ops.Requeue: st.builds(ops.Requeue, id=u32, task_id=st.none() | text200, all=st.booleans(),
                           queue=st.none() | queue_name, kind=st.none() | text200),
    ops.DeleteDead: st.builds(ops.DeleteDead, id=u32, task_id=st.none() | text200, all=st.booleans(),
                              queue=st.none() | queue_name, kind=st.none() | text200),
    ops.Queues: st.builds(ops.Queues, id=u32),
    ops.DeadList: st.builds(ops.DeadList, id=u32, queue=st.none() | queue_name, kind=st.none() | text200,
                            limit=st.integers(1, 1000), after=st.none() | st.integers(0, 2**40),
                            newest_first=st.booleans()),
    ops.Browse: st.builds(ops.Browse, id=u32, state=st.sampled_from(["pending", "dead", "completed"]),
                          queue=st.none() | queue_name, kind=st.none() | text200, limit=st.integers(1, 1000),
                          cursor=st.none() | st.text(max_size=40), newest_first=st.booleans()),
    ops.ScheduleAdd: st.builds(ops.ScheduleAdd, id=u32, name=text200, cron=st.text(min_size=1, max_size=40),
                               task=task_spec, tz=st.text(min_size=1, max_size=20), enabled=st.booleans(),
                               since=st.none() | st.floats(-62_135_596_800, 253_402_300_799)),
    ops.ScheduleRemove: st.builds(ops.ScheduleRemove, id=u32, name=text200),
    ops.Schedules: st.builds(ops.Schedules, id=u32),
})
REQUEST_CLASSES = sorted(REQUEST_TYPES.values(), key=lambda cls: cls.type_byte)


def as_map(msg: Message) -> dict[str, Any]:
    """The MessagePack map a client would send for `msg` (bytes stay bytes)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(msg))


def check_well_formed_error(reply: Error, allowed: set[str]) -> None:
    assert reply.code in allowed
    assert 0 <= reply.id <= 0xFFFF_FFFF
    assert isinstance(reply.message, str) and reply.message
    (type_byte, payload), = FrameReader().feed(encode_frame(reply))  # it goes on the wire as a valid frame
    assert decode_response(type_byte, payload) == reply


def feed_chunked(reader: FrameReader, data: bytes, cuts: list[int]) -> tuple[list[tuple[int, bytes]], str | None]:
    frames: list[tuple[int, bytes]] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(bounds, bounds[1:], strict=False):
        try:
            frames += reader.feed(data[start:end])
        except FrameError as exc:
            return frames + exc.frames, exc.code  # type: ignore[attr-defined]
        assert reader.buffered <= reader.max_frame_bytes + 3  # never more than one (partial) frame
    return frames, None


# ------------------------------------------------------------------ framing


@FAST
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8),
       limit=st.sampled_from([1, 16, 64, 16 * 1024 * 1024]))
def test_any_bytes_in_any_chunking_give_the_same_frames_or_the_same_framing_error(
    data: bytes, cuts: list[int], limit: int
) -> None:
    whole = feed_chunked(FrameReader(limit), data, [])
    chunked = feed_chunked(FrameReader(limit), data, cuts)
    assert chunked == whole
    frames, code = whole
    assert code in (None, ErrorCode.BAD_FRAME, ErrorCode.FRAME_TOO_LARGE)
    for type_byte, payload in frames:
        assert 0 <= type_byte <= 255 and len(payload) + 1 <= limit


@FAST
@given(frames=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=200)), max_size=6),
       cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_well_formed_frames_come_out_unchanged_however_the_stream_is_cut(
    frames: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_raw_frame(t, p) for t, p in frames)
    assert feed_chunked(FrameReader(), stream, cuts) == (frames, None)


@QUICK
@given(length=st.integers(17, 0xFFFF_FFFF), type_byte=st.integers(0, 255))
def test_an_announced_length_over_the_limit_is_refused_before_its_body_arrives(length: int, type_byte: int) -> None:
    reader = FrameReader(16)
    with pytest.raises(FrameError) as caught:
        reader.feed(length.to_bytes(4, "big") + bytes([type_byte]))
    assert caught.value.code == ErrorCode.FRAME_TOO_LARGE
    assert str(length) in caught.value.message
    assert reader.buffered == 0


def test_a_zero_length_frame_is_a_bad_frame_and_keeps_the_frames_before_it() -> None:
    good = encode_raw_frame(0x09, msgspec.msgpack.encode({"id": 1}))
    with pytest.raises(FrameError) as caught:
        FrameReader().feed(good + b"\0\0\0\0" + good)
    assert caught.value.code == ErrorCode.BAD_FRAME
    assert caught.value.frames == [(0x09, msgspec.msgpack.encode({"id": 1}))]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ payloads of any type byte


@FAST
@given(type_byte=st.integers(0, 255), payload=st.binary(max_size=300))
def test_any_type_byte_with_any_payload_decodes_to_a_request_or_a_well_formed_error(
    type_byte: int, payload: bytes
) -> None:
    reply = decode_request(type_byte, payload)
    if isinstance(reply, Error):
        expected = ErrorCode.BAD_REQUEST if type_byte in REQUEST_TYPES else ErrorCode.UNKNOWN_TYPE
        check_well_formed_error(reply, {expected})
    else:
        assert type(reply) is REQUEST_TYPES[type_byte]


@FAST
@given(type_byte=st.integers(0, 255), fields=st.dictionaries(st.text(max_size=10), msgpack_value, max_size=6),
       request_id=u32)
def test_any_map_under_any_type_byte_decodes_to_a_request_or_an_error_echoing_its_id(
    type_byte: int, fields: dict[str, Any], request_id: int
) -> None:
    reply = decode_request(type_byte, msgspec.msgpack.encode({**fields, "id": request_id}))
    if isinstance(reply, Error):
        check_well_formed_error(reply, {ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE})
        assert reply.id == request_id
    else:
        assert type(reply) is REQUEST_TYPES[type_byte] and reply.id == request_id  # type: ignore[attr-defined]


@FAST
@given(payload=st.binary(max_size=300) | msgpack_value.map(msgspec.msgpack.encode))
def test_the_id_of_a_broken_payload_is_a_u32_or_zero_and_never_raises(payload: bytes) -> None:
    assert 0 <= payload_id(payload) <= 0xFFFF_FFFF


def test_deeply_nested_payloads_are_refused_without_a_recursion_error() -> None:
    for payload in (b"\x91" * 200_000, b"\x81\xa1a" * 200_000, b"\x81\xa2id" + b"\x91" * 200_000):
        for type_byte in (0x02, 0x0A, 0x55):
            reply = decode_request(type_byte, payload)
            assert isinstance(reply, Error)
            check_well_formed_error(reply, {ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE})


# ------------------------------------------------------------------ every request type


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda cls: cls.__name__)
def test_every_valid_request_survives_encoding_framing_and_validation_unchanged(cls: type[Message]) -> None:
    @QUICK
    @given(msg=VALID[cls], cuts=st.lists(st.integers(0, 4000), max_size=4))
    def check(msg: Message, cuts: list[int]) -> None:
        frames, error = feed_chunked(FrameReader(), encode_frame(msg), cuts)
        assert error is None and len(frames) == 1
        assert decode_request(*frames[0]) == msg

    check()


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every map key and list index reachable in a request map (the fields a mutation can hit)."""
    found = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found.append((*prefix, key))
        found += _paths(value, (*prefix, key))
    return found


def _mutate(obj: Any, path: tuple[Any, ...], op: str, value: Any) -> Any:
    head, rest = path[0], path[1:]
    if rest:
        obj[head] = _mutate(obj[head], rest, op, value)
    elif op == "delete":
        del obj[head]
    else:
        obj[head] = value
    return obj


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda cls: cls.__name__)
def test_a_mutated_field_of_every_request_is_accepted_or_refused_naming_that_field(cls: type[Message]) -> None:
    @FAST
    @given(msg=VALID[cls], data=st.data())
    def check(msg: Message, data: st.DataObject) -> None:
        fields = as_map(msg)
        paths = [p for p in _paths(fields) if not (isinstance(p[-1], int) and data.draw(st.booleans()))]
        path = data.draw(st.sampled_from(paths))
        deletable = isinstance(path[-1], str)
        op = data.draw(st.sampled_from(["delete", "replace"] if deletable else ["replace"]))
        replacement = data.draw(msgpack_value) if op == "replace" else None
        mutated = _mutate(fields, path, op, replacement)
        reply = decode_request(cls.type_byte, msgspec.msgpack.encode(mutated))
        if isinstance(reply, Error):
            check_well_formed_error(reply, {ErrorCode.BAD_REQUEST})
            if path != ("id",):
                assert reply.id == msg.id  # type: ignore[attr-defined]
            named = [p for p in path if isinstance(p, str)]
            if "metadata" in named:  # a free-form map: its keys are data, the field is `metadata`
                named = named[: named.index("metadata") + 1]
            if named:  # a bad list element is named by its list (`$.tasks[0]`), a field by its name
                assert named[-1] in reply.message, (path, reply.message)
        else:
            assert type(reply) is cls
            assert decode_request(cls.type_byte, encode_frame(reply)[5:]) == reply

    check()


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda cls: cls.__name__)
def test_unknown_keys_are_ignored_by_every_request(cls: type[Message]) -> None:
    @QUICK
    @given(msg=VALID[cls], extra=st.dictionaries(st.text(min_size=1, max_size=12), msgpack_value, max_size=4))
    def check(msg: Message, extra: dict[str, Any]) -> None:
        fields = as_map(msg)
        assume(not set(extra) & set(cls.__struct_fields__))
        assert decode_request(cls.type_byte, msgspec.msgpack.encode({**extra, **fields})) == msg

    check()


@pytest.mark.parametrize("field,bad", [
    ("id", -1), ("id", 2**32), ("id", True), ("id", "1"),
    ("queue", ""), ("queue", "a b"), ("queue", "q\n"), ("queue", "x" * 201),
    ("kind", ""), ("kind", "k" * 201), ("priority", 256), ("priority", -1), ("priority", "urgent"),
    ("max_retries", 101), ("lease_ms", 99), ("lease_ms", 86_400_001), ("payload", "text, not bin"),
])
def test_out_of_range_submit_fields_are_refused_with_bad_request_naming_the_field(field: str, bad: Any) -> None:
    task: dict[str, Any] = {"kind": "k", "payload": b"p"}
    fields: dict[str, Any] = {"id": 7, "task": task}
    (fields if field == "id" else task)[field] = bad
    reply = decode_request(Submit.type_byte, msgspec.msgpack.encode(fields))
    assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_REQUEST
    assert field in reply.message
    assert reply.id == (7 if field != "id" else 0)


def test_a_batch_over_ten_thousand_tasks_is_refused_naming_tasks() -> None:
    payload = msgspec.msgpack.encode({"id": 3, "tasks": [{"kind": "k"}] * 10_001})
    reply = decode_request(SubmitBatch.type_byte, payload)
    assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_REQUEST and "tasks" in reply.message


@pytest.mark.parametrize("run_at", [math.nan, math.inf, -math.inf, 1e300, -1e300])
def test_a_non_finite_or_unrepresentable_run_at_is_refused_with_bad_request(run_at: float) -> None:
    reply = decode_request(Submit.type_byte, msgspec.msgpack.encode({"id": 1, "task": {"kind": "k", "run_at": run_at}}))
    assert isinstance(reply, Error) and "run_at" in reply.message


# ------------------------------------------------------------------ the client's side of the codec


@FAST
@given(type_byte=st.sampled_from(sorted(RESPONSE_TYPES)), payload=st.binary(max_size=200)
       | st.dictionaries(st.text(max_size=10), msgpack_value, max_size=6).map(msgspec.msgpack.encode))
def test_the_client_decoder_raises_only_msgspec_errors_on_any_reply(type_byte: int, payload: bytes) -> None:
    try:
        reply = decode_response(type_byte, payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    assert type(reply) is RESPONSE_TYPES[type_byte]


def test_the_client_decoder_reports_a_deeply_nested_reply_as_a_msgspec_error() -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        decode_response(0x40, b"\x81\xa1a" * 200_000)


def test_every_error_code_the_codec_produces_is_a_protocol_code() -> None:
    assert {ErrorCode.BAD_FRAME, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_REQUEST} <= ALL_CODES
    assert len(ALL_CODES - {ErrorCode.UNAVAILABLE}) == 12  # v1's codes; UNAVAILABLE is v1.1 (docs/protocol.md)
