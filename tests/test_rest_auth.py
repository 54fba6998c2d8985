"""Who may use the REST API: API keys, read-only keys, protected mode and the same-origin rule."""

from __future__ import annotations

import pytest

from tests.helpers import non_loopback_ipv4
from tests.rest_helpers import Http, rest_broker

KEY, READER = "s3cret-write-key", "s3cret-read-key"


@pytest.fixture
def secured(make_broker):  # type: ignore[no-untyped-def]
    broker, port = rest_broker(make_broker, TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS=KEY,
                               TQ_AUTH__READ_ONLY_API_KEYS=READER)
    return broker, port


def test_without_a_key_every_api_route_answers_401(secured) -> None:
    _, port = secured
    http = Http(port)
    status, body = http.call("GET", "/api/v1/stats")
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    assert http.last_headers["www-authenticate"].startswith("Bearer")
    status, _ = http.call("POST", "/api/v1/tasks", {"kind": "k"})
    assert status == 401
    status, _ = Http(port, key="wrong").call("GET", "/api/v1/stats")
    assert status == 401


def test_a_read_only_key_reads_and_queries_but_any_change_is_403(secured) -> None:
    broker, port = secured
    writer, reader = Http(port, key=KEY), Http(port, key=READER)
    status, body = writer.call("POST", "/api/v1/tasks", {"kind": "k"})
    assert status == 201
    task_id = body["task_id"]
    assert reader.call("GET", f"/api/v1/tasks/{task_id}")[0] == 200
    assert reader.call("GET", "/api/v1/stats")[0] == 200
    assert reader.call("POST", "/api/v1/query", {"sql": "SELECT 1 AS one"})[1]["rows"] == [[1]]
    for method, path, body in (("POST", "/api/v1/tasks", {"kind": "k"}), ("DELETE", f"/api/v1/tasks/{task_id}", None),
                               ("POST", "/api/v1/claim", {"worker_id": "w", "queues": ["default"]})):
        status, answer = reader.call(method, path, body)
        assert status == 403 and answer["error"]["code"] == "FORBIDDEN", path
    assert broker.client(api_key=KEY).status(task_id).state == "pending"


def test_no_key_reaches_the_broker_log(secured) -> None:
    broker, port = secured
    Http(port, key="a-wrong-key-1234").call("GET", "/api/v1/stats")
    Http(port, key=READER).call("POST", "/api/v1/tasks", {"kind": "k"})
    Http(port, key=KEY).call("GET", "/api/v1/stats")
    log = broker.log()
    assert "authentication failed" in log
    assert not any(secret in log for secret in (KEY, READER, "a-wrong-key-1234"))


def test_a_change_from_another_origin_is_refused_even_with_a_valid_key(secured) -> None:
    broker, port = secured
    http = Http(port, key=KEY)
    status, body = http.call("POST", "/api/v1/tasks", {"kind": "k"}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in body["error"]["message"]
    status, _ = http.call("POST", "/api/v1/tasks", {"kind": "k"}, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 201
    assert broker.client(api_key=KEY).stats().submitted_total == 1



def test_with_auth_off_a_client_outside_loopback_is_refused_like_on_the_tcp_port(make_broker) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    _, port = rest_broker(make_broker, TQ_API__REST_HOST="0.0.0.0")
    status, body = Http(port, host=address).call("GET", "/api/v1/stats")
    assert status == 401 and "protected mode" in body["error"]["message"]
    assert Http(port).call("GET", "/api/v1/stats")[0] == 200


def test_with_tls_on_the_api_speaks_https_with_the_brokers_certificate(make_broker, tmp_path) -> None:
    import http.client
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    from tests.test_logging_security import make_cert
    cert, key = make_cert(tmp_path, "rest")
    _, port = rest_broker(make_broker, TQ_API__ENABLE_TLS="true", TQ_API__TLS_CERT_PATH=str(cert),
                          TQ_API__TLS_KEY_PATH=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    conn.request("GET", "/api/v1/stats")
    assert conn.getresponse().status == 200
    conn.close()
    plain = Http(port)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.call("GET", "/api/v1/stats")
