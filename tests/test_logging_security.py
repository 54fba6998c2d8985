"""Logging and security hardening against a real broker: JSON log lines, secrets kept out of them,
hashed API keys, protected mode, and TLS for the TCP protocol (self-signed certificates made here with
the `openssl` CLI; those tests skip only if it is missing).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, BrokerProcess, free_port

from actors import context as broker_context
from actors.context import ApiKeys
from tests.helpers import non_loopback_ipv4
from transport.client import Client
from transport.errors import BrokerUnreachable, ClientError, RequestTimeout, Unauthorized
from transport.frames import FrameReader, decode_response, encode_frame
from transport.messages import Error, Hello, Stats

RUN = uuid.uuid4().hex[:10]
PLAIN_KEY = f"plain-key-{RUN}"
HASHED_KEY = f"hashed-key-{RUN}"
UPPER_KEY = f"upper-key-{RUN}"
WRONG_KEY = f"wrong-key-{RUN}"
PAYLOAD = f"PAYLOAD-SECRET-{RUN}".encode()
RESULT = f"RESULT-SECRET-{RUN}".encode()
FAIL_TEXT = f"ERROR-TEXT-{RUN}"
SECRETS = [PLAIN_KEY, HASHED_KEY, UPPER_KEY, WRONG_KEY, PAYLOAD.decode(), RESULT.decode(),
           base64.b64encode(PAYLOAD).decode(), base64.b64encode(RESULT).decode(), PAYLOAD.hex(), RESULT.hex(),
           hashlib.sha256(HASHED_KEY.encode()).hexdigest()]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}
JSON_DEBUG = {"TQ_MONITORING__JSON_LOGGING": "true", "TQ_MONITORING__LOG_LEVEL": "debug"}


def sha256_entry(key: str, upper: bool = False) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return "sha256:" + (digest.upper() if upper else digest)


AUTH = {
    **JSON_DEBUG,
    "TQ_AUTH__ENABLED": "true",
    "TQ_AUTH__API_KEYS": f"{sha256_entry(HASHED_KEY)},{PLAIN_KEY},{sha256_entry(UPPER_KEY, upper=True)}",
    "TQ_BROKER__LEASE_CHECK_INTERVAL_SECS": "0.1",
}


def json_lines(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(parsed JSON objects, lines that are not JSON objects) of a log."""
    parsed, other = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        (parsed if isinstance(entry, dict) else other).append(entry if isinstance(entry, dict) else line)
    return parsed, other


def wait_for_log(broker: BrokerProcess, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0,
                 what: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        entries, _ = json_lines(broker.log())
        found = [e for e in entries if predicate(e)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line {what} within {timeout} s; log:\n{broker.log()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path_factory.mktemp("auth") / "data", AUTH)
    broker.start()
    yield broker
    broker.stop()


# ------------------------------------------------------------------ API keys


@pytest.mark.parametrize("key", [HASHED_KEY, PLAIN_KEY, UPPER_KEY], ids=["sha256", "plaintext", "sha256-upper-hex"])
def test_each_configured_key_form_lets_a_client_in(auth_broker: BrokerProcess, key: str) -> None:
    c = auth_broker.client(api_key=key)
    assert c.welcome is not None and c.welcome.protocol == 1
    assert c.stats().connections >= 1


@pytest.mark.parametrize("key", [WRONG_KEY, sha256_entry(HASHED_KEY), hashlib.sha256(HASHED_KEY.encode()).hexdigest(),
                                 "", PLAIN_KEY.upper(), None],
                         ids=["wrong", "the-digest-entry-itself", "bare-digest", "empty", "case-changed", "none"])
def test_a_wrong_key_or_the_stored_digest_itself_is_refused(auth_broker: BrokerProcess, key: str | None) -> None:
    with pytest.raises(Unauthorized, match="invalid api_key"):
        auth_broker.client(api_key=key)


def test_a_request_before_hello_is_refused_and_the_connection_closed(auth_broker: BrokerProcess) -> None:
    with socket.create_connection(("127.0.0.1", auth_broker.port), timeout=5) as sock:
        sock.sendall(encode_frame(Stats(id=42)))
        data = b""
        while chunk := sock.recv(65536):  # the broker answers, then closes: recv returns b""
            data += chunk
    ((type_byte, payload),) = FrameReader().feed(data)
    reply = decode_response(type_byte, payload)
    assert isinstance(reply, Error) and reply.id == 42 and reply.code == "UNAUTHORIZED"
    assert "HELLO" in reply.message


def test_a_failed_hello_is_logged_with_the_peer_address_and_never_the_key(auth_broker: BrokerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", auth_broker.port), timeout=5)
    peer = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.sendall(encode_frame(Hello(id=1, client="t", protocol=1, api_key=WRONG_KEY)))
    sock.recv(65536)
    sock.close()
    entry = wait_for_log(auth_broker, lambda e: e.get("peer") == peer, what=f"with peer {peer}")
    assert entry["level"] == "warning" and "authentication failed" in entry["msg"]
    assert WRONG_KEY not in json.dumps(entry)


def test_api_keys_compare_every_entry_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first, the last and no entry matching all cost the same number of comparisons."""
    keys = ApiKeys([PLAIN_KEY, sha256_entry(HASHED_KEY), "third", "fourth"])
    calls: list[tuple[bytes, bytes]] = []
    real = broker_context.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(broker_context.hmac, "compare_digest", counting)
    for key, accepted in ((PLAIN_KEY, True), ("fourth", True), (WRONG_KEY, False), ("x" * 4000, False)):
        calls.clear()
        assert keys.accepts(key) is accepted
        assert len(calls) == 4, f"{len(calls)} comparisons for {key[:10]!r}"
        assert {len(a) for a, _ in calls} == {32}, "keys are compared as digests, so their length does not leak"
    assert keys.accepts(None) is False


@pytest.mark.parametrize("entry", ["sha256:not-hex", "sha256:abcd"], ids=["not-hex", "too-short"])
def test_a_malformed_sha256_key_entry_stops_the_start_with_a_config_error(tmp_path: Path, entry: str) -> None:
    env = broker_env(tmp_path, TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS=entry)
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "actors"], cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Traceback" in text or "listening" in text:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    text = log.read_text(errors="replace")
    assert proc.returncode == 2 and "auth.api_keys" in text and "Traceback" not in text, text[-2000:]


# ------------------------------------------------------------------ JSON logs and secrets


def test_json_log_lines_parse_and_never_hold_payloads_results_or_keys(auth_broker: BrokerProcess) -> None:
    c = auth_broker.client(api_key=HASHED_KEY)
    done = c.submit("secret.kind", PAYLOAD, queue="log-q").task_id
    (a,) = c.claim("log-w", ["log-q"], wait_ms=1000)
    c.complete("log-w", a.task_id, RESULT)
    assert c.status(done).result == RESULT
    failing = c.submit("secret.kind", PAYLOAD, queue="log-q", max_retries=0).task_id
    c.claim("log-w", ["log-q"], wait_ms=1000)
    c.fail("log-w", failing, FAIL_TEXT, retry=False)
    expiring = c.submit("secret.kind", PAYLOAD, queue="log-q", lease_ms=100, max_retries=0).task_id
    c.claim("log-w", ["log-q"], wait_ms=1000)
    c.deregister("log-w")
    with pytest.raises(Unauthorized):
        auth_broker.client(api_key=WRONG_KEY)

    wait_for_log(auth_broker, lambda e: e.get("msg") == "worker registered" and e.get("worker_id") == "log-w",
                 what="for the worker")
    wait_for_log(auth_broker, lambda e: e.get("msg") == "worker deregistered" and e.get("worker_id") == "log-w",
                 what="for the deregistration")
    wait_for_log(auth_broker, lambda e: e.get("msg") == "authentication failed" and "peer" in e,
                 what="for the failed HELLO")
    c.stats()
    entries, other = json_lines(auth_broker.log())
    assert other == [], f"lines that are not JSON objects: {other[:5]}"
    for entry in entries:
        assert TS.match(entry["ts"]), entry
        assert entry["level"] in LEVELS and isinstance(entry["logger"], str) and isinstance(entry["msg"], str)
    listening = next(e for e in entries if e["msg"].startswith("tqbroker listening"))
    assert listening["port"] == auth_broker.port and listening["host"] == "127.0.0.1"
    assert any(e["level"] == "debug" for e in entries), "log_level debug shows debug lines"

    text = auth_broker.log()
    for secret in SECRETS + [FAIL_TEXT]:
        assert secret not in text, f"{secret!r} reached the log"
    assert expiring  # its lease ran out or it was handed back on DEREGISTER: either way no payload logged


def test_text_logging_appends_the_context_fields(make_broker: Callable[..., BrokerProcess]) -> None:
    broker = make_broker(TQ_MONITORING__JSON_LOGGING="false", TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS=PLAIN_KEY)
    with pytest.raises(Unauthorized):
        broker.client(api_key=WRONG_KEY)
    deadline = time.monotonic() + 5
    while "authentication failed" not in broker.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(ln for ln in broker.log().splitlines() if "authentication failed" in ln)
    assert re.search(r"WARNING\s+tqbroker\.connection: authentication failed \[peer=127\.0\.0\.1:\d+\]$", line), line
    assert WRONG_KEY not in broker.log() and PLAIN_KEY not in broker.log()


# ------------------------------------------------------------------ protected mode



def test_a_remote_peer_without_auth_is_refused_in_protected_mode(make_broker: Callable[..., BrokerProcess]) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    broker = make_broker(TQ_BROKER__HOST="0.0.0.0", **JSON_DEBUG)
    with socket.create_connection((address, broker.port), timeout=5) as sock:
        peer = f"{address}:{sock.getsockname()[1]}"
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    ((type_byte, payload),) = FrameReader().feed(data)
    reply = decode_response(type_byte, payload)
    assert isinstance(reply, Error) and reply.id == 0 and reply.code == "UNAUTHORIZED"
    for words in ("protected mode", "auth.enabled", "auth.api_keys", "allow_unauthenticated_remote"):
        assert words in reply.message
    entry = wait_for_log(broker, lambda e: e.get("peer") == peer, what=f"for the refused {peer}")
    assert entry["level"] == "warning" and "protected mode" in entry["msg"]
    with pytest.raises(Unauthorized, match="protected mode"):
        Client(address, broker.port, timeout=5)
    assert broker.client().stats() is not None  # loopback is still welcome


def test_allow_unauthenticated_remote_lets_a_remote_peer_in(make_broker: Callable[..., BrokerProcess]) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    broker = make_broker(TQ_BROKER__HOST="0.0.0.0", TQ_AUTH__ALLOW_UNAUTHENTICATED_REMOTE="true")
    with Client(address, broker.port, timeout=5) as c:
        assert c.submit("remote").task_id


# ------------------------------------------------------------------ TLS


def broker_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({
        "PYTHONPATH": str(ROOT), "TQ_BROKER__HOST": "127.0.0.1", "TQ_BROKER__PORT": str(free_port()),
        "TQ_MONITORING__PROMETHEUS_PORT": "0",
        "TQ_API__REST_PORT": "0", "TQ_PERSISTENCE__DATA_DIR": str(tmp_path / "data"),
        "TQ_MONITORING__JSON_LOGGING": "true", **settings,
    })
    return env


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(directory, "broker")
    other, _ = make_cert(directory, "other-ca")
    return {"cert": cert, "key": key, "other": other}


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path_factory.mktemp("tlsbroker") / "data", {
        **JSON_DEBUG, "TQ_API__ENABLE_TLS": "true", "TQ_API__TLS_CERT_PATH": str(certs["cert"]),
        "TQ_API__TLS_KEY_PATH": str(certs["key"]), "TQ_BROKER__CONNECTION_TIMEOUT_SECS": "1",
    })
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"], ids=["hostname-verified", "by-ip"])
def test_a_tls_client_round_trips_with_a_self_signed_certificate(tls_broker: BrokerProcess, certs: dict[str, Path],
                                                                 host: str) -> None:
    with Client(host, tls_broker.port, tls=True, ca_file=str(certs["cert"]), timeout=10) as c:
        task = c.submit("tls.kind", PAYLOAD, queue=f"tls-{host}").task_id
        (a,) = c.claim("tls-w", [f"tls-{host}"], wait_ms=1000)
        assert (a.task_id, a.payload) == (task, PAYLOAD)
        big = os.urandom(1 << 20)  # a reply spanning many TLS records
        c.complete("tls-w", task, big)
        info = c.status(task)
        assert info.state == "completed" and info.result == big


def test_a_plaintext_client_against_a_tls_broker_fails_clearly_and_quickly(tls_broker: BrokerProcess,
                                                                         certs: dict[str, Path]) -> None:
    started = time.monotonic()
    with pytest.raises(ClientError) as failed:
        Client("127.0.0.1", tls_broker.port, timeout=5)
    assert not isinstance(failed.value, RequestTimeout), "it must fail at once, not wait for a reply"
    assert time.monotonic() - started < 4
    assert str(tls_broker.port) in str(failed.value)
    with Client("127.0.0.1", tls_broker.port, tls=True, ca_file=str(certs["cert"])) as c:  # others unaffected
        assert c.stats() is not None


@pytest.mark.parametrize("ca", ["none", "other"], ids=["system-cas-only", "another-ca"])
def test_a_tls_client_refuses_a_certificate_it_cannot_verify(tls_broker: BrokerProcess, certs: dict[str, Path],
                                                            ca: str) -> None:
    ca_file = None if ca == "none" else str(certs["other"])
    with pytest.raises(BrokerUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        Client("localhost", tls_broker.port, tls=True, ca_file=ca_file, timeout=5)


def test_a_tls_client_against_a_plaintext_broker_fails_clearly(make_broker: Callable[..., BrokerProcess],
                                                               certs: dict[str, Path]) -> None:
    broker = make_broker()
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="TLS"):
        Client("127.0.0.1", broker.port, tls=True, ca_file=str(certs["cert"]), timeout=5)
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("broken", ["missing-cert", "missing-key", "cert-is-not-a-certificate"])
def test_a_missing_or_bad_cert_or_key_stops_the_start_with_one_line_naming_the_file(
    tmp_path: Path, certs: dict[str, Path], broken: str
) -> None:
    cert, key = str(certs["cert"]), str(certs["key"])
    if broken == "missing-cert":
        cert = named = str(tmp_path / "no-such-cert.pem")
    elif broken == "missing-key":
        key = named = str(tmp_path / "no-such-key.pem")
    else:
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate\n")
        cert = named = str(garbage)
    env = broker_env(tmp_path, TQ_API__ENABLE_TLS="true", TQ_API__TLS_CERT_PATH=cert, TQ_API__TLS_KEY_PATH=key)
    done = subprocess.run([sys.executable, "-m", "actors"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    _, plain = json_lines(done.stderr)
    assert len(plain) == 1 and plain[0].startswith("tqbroker: ") and named in plain[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_an_unreadable_key_stops_the_start_naming_it(tmp_path: Path, certs: dict[str, Path]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file: an unreadable key cannot be made")
    key = tmp_path / "locked.key"
    key.write_bytes(certs["key"].read_bytes())
    key.chmod(0)
    env = broker_env(tmp_path, TQ_API__ENABLE_TLS="true", TQ_API__TLS_CERT_PATH=str(certs["cert"]),
                     TQ_API__TLS_KEY_PATH=str(key))
    done = subprocess.run([sys.executable, "-m", "actors"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and str(key) in done.stderr and "Traceback" not in done.stderr


def test_a_failed_tls_handshake_is_logged_as_one_json_line_with_the_peer(tls_broker: BrokerProcess) -> None:
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=5) as sock:
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendall(b"\x00\x00\x00\x05\x09\x81\xa2id\x01")  # plaintext STATS to a TLS port
        try:
            sock.recv(100)
        except OSError:
            pass
    entry = wait_for_log(tls_broker, lambda e: e.get("peer") == peer, timeout=2, what=f"for the handshake of {peer}")
    assert "TLS" in entry["msg"] or "handshake" in entry["msg"]
    _, other = json_lines(tls_broker.log())
    assert other == [], f"non-JSON lines in the log: {other[:3]}"


def test_a_connection_that_never_starts_its_tls_handshake_is_closed_after_the_idle_timeout(
    tls_broker: BrokerProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=5) as sock:
        sock.settimeout(3)  # connection_timeout_secs is 1 for this broker
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
