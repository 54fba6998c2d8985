"""The REST API against a real broker over real HTTP: the same tasks, states and errors as the TCP port."""

from __future__ import annotations

import base64

import falcon.inspect
import pytest
from openapi_spec_validator import validate

from actors.http.app import OPENAPI_PATH
from tests.rest_helpers import Http, rest_broker


@pytest.fixture
def rest(make_broker):  # type: ignore[no-untyped-def]
    broker, port = rest_broker(make_broker, TQ_BROKER__QUEUE_DEPTH_THRESHOLD="5")
    client = Http(port)
    yield broker, client
    client.close()


def test_a_task_posted_as_json_is_read_back_and_claimed_with_its_json_payload(rest) -> None:
    broker, http = rest
    status, body = http.call("POST", "/api/v1/tasks", {"kind": "resize", "queue": "media", "priority": "high",
                                                       "payload": {"path": "cat.jpg", "width": 64}})
    assert status == 201 and body["duplicate"] is False
    task_id = body["task_id"]
    status, info = http.call("GET", f"/api/v1/tasks/{task_id}")
    assert status == 200 and (info["state"], info["priority"], info["queue"]) == ("pending", 255, "media")
    status, claimed = http.call("POST", "/api/v1/claim", {"worker_id": "w1", "queues": ["media"]})
    assert status == 200 and claimed["tasks"][0]["payload"] == {"path": "cat.jpg", "width": 64}
    status, _ = http.call("POST", f"/api/v1/tasks/{task_id}/result", {"worker_id": "w1", "ok": True,
                                                                      "result": [1, "two"]})
    assert status == 200
    status, info = http.call("GET", f"/api/v1/tasks/{task_id}")
    assert info["state"] == "completed" and info["result"] == [1, "two"]
    assert broker.client().status(task_id).result == b'[1, "two"]'  # the JSON text as sent, as bytes


def test_binary_payloads_and_results_travel_as_base64(rest) -> None:
    _, http = rest
    raw = bytes(range(256))
    _, body = http.call("POST", "/api/v1/tasks", {"kind": "bin", "payload_base64": base64.b64encode(raw).decode()})
    _, claimed = http.call("POST", "/api/v1/claim", {"worker_id": "w1", "queues": ["default"]})
    assert base64.b64decode(claimed["tasks"][0]["payload_base64"]) == raw
    http.call("POST", f"/api/v1/tasks/{body['task_id']}/result",
              {"worker_id": "w1", "ok": True, "result_base64": base64.b64encode(b"\xff\x00").decode()})
    _, info = http.call("GET", f"/api/v1/tasks/{body['task_id']}")
    assert info["result_base64"] == base64.b64encode(b"\xff\x00").decode() and "result" not in info


def test_a_cancelled_task_is_cancelled_for_tcp_clients_too_and_cannot_be_cancelled_twice(rest) -> None:
    broker, http = rest
    task_id = broker.client().submit("k", b"x").task_id
    status, body = http.call("DELETE", f"/api/v1/tasks/{task_id}")
    assert status == 200 and body == {"task_id": task_id, "state": "cancelled"}
    assert broker.client().status(task_id).state == "cancelled"
    status, body = http.call("DELETE", f"/api/v1/tasks/{task_id}")
    assert status == 409 and body["error"]["code"] == "INVALID_STATE"


def test_protocol_errors_map_to_http_statuses_with_a_json_error_body(rest) -> None:
    _, http = rest
    status, body = http.call("GET", "/api/v1/tasks/no-such-task")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = http.call("POST", "/api/v1/tasks", {"kind": "k", "priority": 300})
    assert status == 400 and "priority" in body["error"]["message"]
    status, body = http.call("POST", "/api/v1/tasks", raw=b"{not json")
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST"
    status, body = http.call("POST", "/api/v1/tasks", {"kind": "k", "payload": 1, "payload_base64": "AA=="})
    assert status == 400 and "not both" in body["error"]["message"]
    status, body = http.call("GET", "/api/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = http.call("POST", "/api/v1/tasks/result-less/result", {"worker_id": "w", "ok": True})
    assert status == 404


def test_a_full_queue_answers_429_and_a_batch_is_refused_whole(rest) -> None:
    broker, http = rest
    status, body = http.call("POST", "/api/v1/tasks/batch", {"tasks": [{"kind": "k"}] * 5})
    assert status == 201 and len(body["task_ids"]) == 5
    status, body = http.call("POST", "/api/v1/tasks", {"kind": "k"})
    assert status == 429 and body["error"]["code"] == "QUEUE_FULL"
    assert broker.client().stats().pending == 5


def test_a_body_over_the_frame_limit_is_refused_with_413(make_broker) -> None:
    _, port = rest_broker(make_broker, TQ_BROKER__MAX_FRAME_BYTES="2048")
    http = Http(port)
    status, body = http.call("POST", "/api/v1/tasks", {"kind": "k", "payload": "x" * 4096})
    assert status == 413 and "broker.max_frame_bytes" in body["error"]["message"]
    http.close()


def test_stats_queues_workers_and_heartbeat_answer_like_the_tcp_port(rest) -> None:
    broker, http = rest
    http.call("POST", "/api/v1/tasks", {"kind": "k", "queue": "q1", "priority": 10})
    _, claimed = http.call("POST", "/api/v1/claim", {"worker_id": "rest-worker", "queues": ["q1"]})
    task_id = claimed["tasks"][0]["task_id"]
    status, _ = http.call("POST", "/api/v1/workers/rest-worker/heartbeat", {"active": [task_id],
                                                                           "cpu_percent": 12.5})
    assert status == 200
    _, stats = http.call("GET", "/api/v1/stats")
    assert stats["running"] == 1 and stats["submitted_total"] == 1
    _, queues = http.call("GET", "/api/v1/queues")
    assert queues["queues"]["q1"]["running"] == 1
    _, workers = http.call("GET", "/api/v1/workers")
    [worker] = [w for w in workers["workers"] if w["worker_id"] == "rest-worker"]
    assert worker["running"] == [task_id] and worker["cpu_percent"] == 12.5


def test_a_long_poll_claim_is_answered_when_a_task_arrives_over_tcp(rest) -> None:
    import threading

    broker, http = rest
    answer: dict = {}
    waiter = threading.Thread(target=lambda: answer.update(
        r=http.call("POST", "/api/v1/claim", {"worker_id": "w", "queues": ["late"], "wait_ms": 20000})))
    waiter.start()
    from tests.helpers import wait_for
    wait_for(lambda: broker.client().stats() is not None)
    task_id = broker.client().submit("k", b"1", queue="late").task_id
    waiter.join(timeout=25)
    status, body = answer["r"]
    assert status == 200 and body["tasks"][0]["task_id"] == task_id and body["tasks"][0]["payload"] == 1


def test_sql_over_history_answers_columns_and_rows_and_refuses_writes(rest) -> None:
    broker, http = rest
    _, body = http.call("POST", "/api/v1/tasks", {"kind": "k"})
    http.call("DELETE", f"/api/v1/tasks/{body['task_id']}")
    from tests.helpers import wait_for
    sql = {"sql": "SELECT task_id, state FROM task_history"}
    rows = wait_for(lambda: http.call("POST", "/api/v1/query", sql)[1]["rows"])
    assert rows == [[body["task_id"], "cancelled"]]
    status, answer = http.call("POST", "/api/v1/query", sql)
    assert answer["columns"] == ["task_id", "state"] and answer["truncated"] is False
    status, answer = http.call("POST", "/api/v1/query", {"sql": "DELETE FROM task_history"})
    assert status == 400 and answer["error"]["code"] == "BAD_REQUEST"


def test_the_openapi_document_is_valid_and_lists_every_route_of_the_app(rest) -> None:
    _, http = rest
    status, doc = http.call("GET", OPENAPI_PATH)
    assert status == 200
    validate(doc)
    from actors.http.app import build_app
    from tests.rest_unit_context import context
    app = build_app(context(), query=None)
    for route in falcon.inspect.inspect_routes(app):
        if not route.path.startswith("/api/"):
            continue
        methods = {m.method.lower() for m in route.methods if not m.internal}
        assert route.path in doc["paths"], route.path
        assert methods == set(doc["paths"][route.path]), route.path


def test_an_idle_http_connection_is_closed_after_the_connection_timeout(make_broker) -> None:
    from tests.helpers import RawConn

    _, port = rest_broker(make_broker, TQ_BROKER__CONNECTION_TIMEOUT_SECS="1")
    idle = RawConn(port)
    assert idle.wait_closed(timeout=15) is not None
    idle.close()
