"""Pure logic of the HTTP side: body conversions, charts, the bearer header, the error table."""

from __future__ import annotations

import base64

import msgspec
import pytest

from actors.http.charts import runtime_svg, throughput_svg
from actors.http.errors import STATUS
from actors.http.guard import _bearer
from actors.http.schemas import ApiError, TaskIn, json_or_base64, task_spec
from transport.messages import ErrorCode


def decode(body: bytes) -> TaskIn:
    return msgspec.json.decode(body, type=TaskIn)


def test_a_json_payload_is_stored_as_the_json_text_sent_and_delay_ms_becomes_run_at() -> None:
    spec = task_spec(decode(b'{"kind": "k", "payload": {"a": [1, 2]}, "delay_ms": 1500}'), now=100.0)
    assert spec.payload == b'{"a": [1, 2]}' and spec.run_at == 101.5


def test_giving_both_run_at_and_delay_ms_or_both_payloads_is_refused_by_name() -> None:
    with pytest.raises(ApiError, match="run_at or delay_ms"):
        task_spec(decode(b'{"kind": "k", "run_at": 5, "delay_ms": 5}'))
    with pytest.raises(ApiError, match="payload or payload_base64"):
        task_spec(decode(b'{"kind": "k", "payload": 1, "payload_base64": "AA=="}'))
    with pytest.raises(ApiError, match="not valid base64"):
        task_spec(decode(b'{"kind": "k", "payload_base64": "%%%"}'))


def test_an_unknown_field_in_a_body_is_refused_naming_it() -> None:
    with pytest.raises(msgspec.ValidationError, match="priorty"):
        decode(b'{"kind": "k", "priorty": 5}')


def test_bytes_come_back_as_json_when_they_are_json_text_else_as_base64() -> None:
    assert json_or_base64(b'{"ok": true}') == ({"ok": True}, msgspec.UNSET)
    assert json_or_base64(b"\xff\x00") == (msgspec.UNSET, base64.b64encode(b"\xff\x00").decode())
    assert json_or_base64(b"") == (msgspec.UNSET, "")


def test_charts_escape_kind_names_and_place_each_minute_in_its_bar() -> None:
    svg = runtime_svg([["<script>alert(1)</script>", 1.0, 2.0, 3]])
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    bars = throughput_svg([[1000, 3, 1], [941, 7, 0], [940, 9, 9]], minutes=60, now_minute=1000)  # 940: too old
    assert bars.count('class="ok"') == 2 and bars.count('class="fail"') == 1 and "max 7/min" in bars
    assert throughput_svg([[1, 5, 5]], minutes=60, now_minute=1000).count("<rect") == 0  # older than the window


def test_the_bearer_header_yields_the_key_and_nothing_else() -> None:
    assert _bearer("Bearer abc") == "abc" and _bearer("bearer  abc ") == "abc"
    assert _bearer("Basic abc") is None and _bearer("Bearer ") is None and _bearer(None) is None


def test_every_protocol_error_code_has_an_http_status() -> None:
    codes = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert codes <= set(STATUS)
    assert STATUS[ErrorCode.QUEUE_FULL] == 429 and STATUS["FORBIDDEN"] == 403
