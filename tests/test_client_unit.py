"""Unit tests of transport.client against a scripted fake broker (plain sockets, one thread per connection).

The fake answers with canned replies, so these tests pin the client's side of the contract (ids,
pipelining, error mapping, connection loss) without the real broker. `FakeBroker` is also imported by
the CLI tests and by the gevent subprocess below.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from transport import messages as m
from transport.client import Client
from transport.errors import (
    ERROR_CLASSES,
    BrokerError,
    BrokerUnreachable,
    ClientError,
    ConnectionLost,
    FrameTooLarge,
    NotFound,
    ProtocolError,
    QueueFull,
    RequestTimeout,
    TooManyConnections,
)
from transport.frames import FrameReader, decode_request, encode_frames

ROOT = Path(__file__).resolve().parent.parent


class FakeConn:
    """The broker's end of one client connection: read typed requests, send replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader()
        self._frames: deque[tuple[int, bytes]] = deque()

    def read(self) -> m.Message | None:
        """The next request, or None once the client closed."""
        while not self._frames:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self._frames.extend(self._reader.feed(data))
        return decode_request(*self._frames.popleft())

    def read_n(self, n: int) -> list[m.Message]:
        out = [self.read() for _ in range(n)]
        assert all(req is not None for req in out)
        return out  # type: ignore[return-value]

    def send(self, *msgs: m.Message) -> None:
        self.sock.sendall(encode_frames(list(msgs)))

    def welcome(self) -> m.Hello:
        hello = self.read()
        assert isinstance(hello, m.Hello)
        self.send(answer(hello))
        return hello


Script = Callable[[FakeConn], None]


class FakeBroker:
    """Listens on a free loopback port and runs `script` for each accepted connection in its own thread.

    An exception in a script (a failed assert about what the client sent) is re-raised on exit.
    """

    def __init__(self, *scripts: Script, tls: ssl.SSLContext | None = None) -> None:
        self._scripts = list(scripts)
        self._tls = tls
        self.requests: list[m.Message] = []
        self.errors: list[BaseException] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        for index in itertools.count():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.settimeout(10)
            self._socks.append(sock)
            script = self._scripts[min(index, len(self._scripts) - 1)]
            thread = threading.Thread(target=self._run, args=(script, sock), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, script: Script, sock: socket.socket) -> None:
        try:
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_side=True)
                except ssl.SSLError:  # a client that refused our certificate: its test checks its side
                    return
            script(FakeConn(sock))
        except BaseException as exc:  # noqa: BLE001 - surfaced in __exit__
            self.errors.append(exc)
        finally:
            sock.close()

    def __enter__(self) -> FakeBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in [self._listener, *self._socks]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
        if self.errors:
            raise self.errors[0]


def answer(req: m.Message) -> m.Message:
    """The canned success reply for any request."""
    rid = req.id  # type: ignore[attr-defined]
    match req:
        case m.Hello():
            return m.Welcome(id=rid, server="fake/1", protocol=1, heartbeat_interval_ms=5000, max_batch_claim=64)
        case m.Submit(task=task):
            return m.Submitted(id=rid, task_id=f"t-{task.kind}", duplicate=task.unique_key is not None)
        case m.SubmitBatch(tasks=tasks):
            return m.SubmittedBatch(id=rid, task_ids=[f"t-{t.kind}" for t in tasks])
        case m.Claim(queues=queues, max_tasks=n):
            return m.Assigned(id=rid, tasks=[
                m.Assignment(task_id=f"a{i}", queue=queues[0], kind="k", payload=b"p", priority=150, attempt=1,
                             lease_expires_at=1.0)
                for i in range(n)
            ])
        case m.Status(task_id=task_id):
            return m.TaskStatus(id=rid, task=m.TaskInfo(task_id=task_id, queue="default", kind="k", priority=150,
                                                       state="pending", attempts=0, max_retries=3,
                                                       submitted_at=1.0, run_at=1.0))
        case m.Stats():
            return m.StatsReply(id=rid, stats=m.StatsInfo(
                pending=1, scheduled=2, running=3, completed_total=4, failed_total=5, cancelled_total=6,
                submitted_total=7, workers_alive=8, connections=9, uptime_s=10.5,
                queues={"default": m.QueueStats(pending=1, normal=1)},
            ))
        case m.Register(worker_id=worker_id):
            return m.Registered(id=rid, worker_id=worker_id or "w-auto")
        case m.Workers():
            return m.WorkerList(id=rid, workers=[m.WorkerInfo(
                worker_id="w1", name="n", hostname="h", pid=1, queues=["default"], concurrency=2, metadata={},
                alive=True, last_heartbeat=1.0, cpu_percent=0.5, memory_bytes=1024, running=["t1"],
            )])
        case m.Query(sql=sql):
            return m.Rows(id=rid, columns=["sql", "n"], rows=[[sql, 1]])
        case m.Error():
            raise AssertionError(f"client sent an undecodable request: {req}")
        case _:
            return m.Ok(id=rid)


def serve_all(broker_requests: list[m.Message] | None = None) -> Script:
    """A script answering every request with `answer`, recording the requests."""

    def script(conn: FakeConn) -> None:
        while (req := conn.read()) is not None:
            if broker_requests is not None:
                broker_requests.append(req)
            conn.send(answer(req))

    return script


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- connecting


def test_connecting_sends_hello_with_protocol_1_and_the_api_key_and_keeps_the_welcome() -> None:
    seen: list[m.Message] = []
    with FakeBroker(serve_all(seen)) as broker, Client(port=broker.port, api_key="k1", client_name="me") as client:
        assert client.welcome == answer(m.Hello(id=1, client="x", protocol=1))
        assert client.welcome.max_batch_claim == 64
    assert seen[0] == m.Hello(id=seen[0].id, client="me", protocol=1, api_key="k1")


def test_a_refused_connection_raises_broker_unreachable_naming_the_address() -> None:
    port = free_port()
    with pytest.raises(BrokerUnreachable) as info:
        Client(port=port, timeout=2)
    assert str(info.value) == f"broker not reachable at 127.0.0.1:{port}: Connection refused"
    assert isinstance(info.value, ClientError) and not isinstance(info.value, BrokerError)


def test_a_client_made_with_connect_false_dials_only_when_asked() -> None:
    with FakeBroker(serve_all()) as broker:
        client = Client(port=broker.port, connect=False)
        with pytest.raises(ConnectionLost):
            client.stats()
        client.connect()
        assert client.stats().pending == 1
        client.close()


def test_an_unauthorized_hello_fails_the_constructor() -> None:
    def refuse(conn: FakeConn) -> None:
        hello = conn.read()
        conn.send(m.Error(id=hello.id, code="UNAUTHORIZED", message="bad api key"))  # type: ignore[union-attr]

    with FakeBroker(refuse) as broker, pytest.raises(BrokerError) as info:
        Client(port=broker.port, api_key="wrong")
    assert info.value.code == "UNAUTHORIZED" and info.value.message == "bad api key"


# ---------------------------------------------------------------- typed requests


def test_every_typed_method_sends_its_request_and_returns_the_useful_part_of_the_reply() -> None:
    seen: list[m.Message] = []
    with FakeBroker(serve_all(seen)) as broker, Client(port=broker.port) as c:
        sub = c.submit("email", b"\x01", queue="q", priority="high", run_at=5.0, max_retries=2, lease_ms=1000,
                       unique_key="u")
        assert (sub.task_id, sub.duplicate) == ("t-email", True)
        assert c.submit_batch([m.TaskSpec(kind="a"), m.TaskSpec(kind="b")]) == ["t-a", "t-b"]
        assert [a.task_id for a in c.claim("w1", ["q"], max_tasks=2, wait_ms=10)] == ["a0", "a1"]
        assert c.complete("w1", "a0", b"r") is None
        assert c.fail("w1", "a1", "boom", retry=False) is None
        assert c.heartbeat("w1", ["a0"], cpu_percent=1.5, memory_bytes=10) is None
        assert c.status("t9").task_id == "t9"
        assert c.cancel("t9") is None
        assert c.stats().queues["default"].pending == 1
        assert c.register(name="n", queues=["q"], concurrency=4, metadata={"a": "b"}) == "w-auto"
        assert c.register("w7") == "w7"
        assert c.deregister("w7") is None
        assert c.workers()[0].running == ["t1"]
        assert c.query("SELECT 1") == (["sql", "n"], [["SELECT 1", 1]])
    kinds = [type(req).__name__ for req in seen[1:]]
    assert kinds == ["Submit", "SubmitBatch", "Claim", "Result", "Result", "Heartbeat", "Status", "Cancel",
                     "Stats", "Register", "Register", "Deregister", "Workers", "Query"]
    assert seen[1].task == m.TaskSpec(kind="email", payload=b"\x01", queue="q", priority="high",  # type: ignore
                                      run_at=5.0, max_retries=2, lease_ms=1000, unique_key="u")
    assert seen[4].ok is True and seen[4].result == b"r"  # type: ignore[attr-defined]
    assert (seen[5].ok, seen[5].error, seen[5].retry) == (False, "boom", False)  # type: ignore[attr-defined]
    assert all(req.id != 0 for req in seen)  # type: ignore[attr-defined]


def test_a_reply_of_the_wrong_type_raises_protocol_error() -> None:
    def wrong(conn: FakeConn) -> None:
        conn.welcome()
        req = conn.read()
        conn.send(m.Ok(id=req.id))  # type: ignore[union-attr]
        conn.read()

    with FakeBroker(wrong) as broker, Client(port=broker.port) as c, pytest.raises(ProtocolError):
        c.stats()


# ---------------------------------------------------------------- pipelining


def test_pipelined_replies_that_come_back_in_reverse_order_reach_their_own_requests() -> None:
    def reverse(conn: FakeConn) -> None:
        conn.welcome()
        reqs = conn.read_n(5)
        conn.send(*[answer(req) for req in reversed(reqs)])
        serve_all()(conn)

    with FakeBroker(reverse) as broker, Client(port=broker.port) as c:
        replies = c.pipeline([m.Status(id=0, task_id=f"t{i}") for i in range(5)])
        assert [r.task.task_id for r in replies] == [f"t{i}" for i in range(5)]


def test_a_waiting_claim_does_not_hold_up_a_request_sent_after_it() -> None:
    def claim_last(conn: FakeConn) -> None:
        conn.welcome()
        claim, stats = conn.read_n(2)
        conn.send(answer(stats))
        conn.read()  # the test's "claim may finish now" signal, sent after it saw the STATS reply
        conn.send(answer(claim))
        serve_all()(conn)

    with FakeBroker(claim_last) as broker, Client(port=broker.port) as c:
        claim = c.send_async(m.Claim(id=0, worker_id="w", queues=["q"], max_tasks=1, wait_ms=5000))
        assert c.stats().running == 3
        assert not claim.done()
        c.send_async(m.Workers(id=0))
        assert claim.get().tasks[0].queue == "q"  # type: ignore[attr-defined]


def test_pipeline_writes_all_frames_with_one_sendall() -> None:
    with FakeBroker(serve_all()) as broker, Client(port=broker.port) as c:
        conn = c._conn
        assert conn is not None
        real = conn.sock
        calls: list[int] = []

        class Spy:
            def sendall(self, data: bytes) -> None:
                calls.append(len(data))
                real.sendall(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        conn.sock = Spy()  # type: ignore[assignment]
        assert len(c.pipeline([m.Stats(id=0)] * 20)) == 20
        assert len(calls) == 1


def test_pipeline_raises_the_first_failure_or_returns_it_in_place_when_asked() -> None:
    def second_fails(conn: FakeConn) -> None:
        conn.welcome()
        while (req := conn.read()) is not None:
            full = isinstance(req, m.Submit) and req.task.kind == "bad"
            conn.send(m.Error(id=req.id, code="QUEUE_FULL", message="full") if full else answer(req))

    specs = [m.Submit(id=0, task=m.TaskSpec(kind=k)) for k in ("a", "bad", "c")]
    with FakeBroker(second_fails) as broker, Client(port=broker.port) as c:
        with pytest.raises(QueueFull):
            c.pipeline(specs)
        out = c.pipeline(specs, return_exceptions=True)
        assert out[0].task_id == "t-a" and isinstance(out[1], QueueFull) and out[2].task_id == "t-c"


def test_request_ids_wrap_around_and_never_use_zero() -> None:
    seen: list[m.Message] = []
    with FakeBroker(serve_all(seen)) as broker, Client(port=broker.port) as c:
        c._ids = itertools.count(0xFFFF_FFFE)
        for _ in range(3):
            c.stats()
    assert [req.id for req in seen[1:]] == [0xFFFF_FFFF, 1, 2]  # type: ignore[attr-defined]


def test_many_threads_sharing_one_client_each_get_their_own_replies() -> None:
    with FakeBroker(serve_all()) as broker, Client(port=broker.port) as c:
        wrong: list[str] = []

        def work(n: int) -> None:
            for i in range(200):
                task_id = f"{n}-{i}"
                if c.status(task_id).task_id != task_id:
                    wrong.append(task_id)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == []
        assert c._conn is not None and c._conn.pending == {}


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("code", sorted(ERROR_CLASSES))
def test_each_error_code_raises_its_own_exception_and_the_connection_stays_usable(code: str) -> None:
    def fail_first(conn: FakeConn) -> None:
        conn.welcome()
        req = conn.read()
        conn.send(m.Error(id=req.id, code=code, message=f"about {code}"))  # type: ignore[union-attr]
        serve_all()(conn)

    with FakeBroker(fail_first) as broker, Client(port=broker.port) as c:
        with pytest.raises(ERROR_CLASSES[code]) as info:
            c.status("x")
        assert (info.value.code, info.value.message) == (code, f"about {code}")
        assert info.value.request_id != 0 and isinstance(info.value, BrokerError)
        assert c.status("y").task_id == "y"


def test_an_error_code_unknown_to_this_client_still_raises_broker_error() -> None:
    def novel(conn: FakeConn) -> None:
        conn.welcome()
        req = conn.read()
        conn.send(m.Error(id=req.id, code="FROM_THE_FUTURE", message="m"))  # type: ignore[union-attr]
        conn.read()

    with FakeBroker(novel) as broker, Client(port=broker.port) as c, pytest.raises(BrokerError) as info:
        c.stats()
    assert type(info.value) is BrokerError and info.value.code == "FROM_THE_FUTURE"


def test_an_id_zero_error_then_close_fails_every_pending_reply_with_that_error() -> None:
    def overloaded(conn: FakeConn) -> None:
        conn.welcome()
        conn.read_n(3)
        conn.send(m.Error(id=0, code="TOO_MANY_CONNECTIONS", message="max 1000"))

    with FakeBroker(overloaded) as broker, Client(port=broker.port) as c:
        slots = [c.send_async(m.Status(id=0, task_id=str(i))) for i in range(3)]
        for slot in slots:
            with pytest.raises(TooManyConnections, match="max 1000"):
                slot.get()
        with pytest.raises(ConnectionLost):
            c.stats()


def test_an_id_zero_error_with_nothing_pending_is_raised_by_the_next_call() -> None:
    def too_large(conn: FakeConn) -> None:
        conn.welcome()
        conn.send(m.Error(id=0, code="FRAME_TOO_LARGE", message="over 16 MiB"))

    with FakeBroker(too_large) as broker, Client(port=broker.port) as c:
        with pytest.raises(FrameTooLarge):
            c.stats()
        with pytest.raises(ConnectionLost, match="FRAME_TOO_LARGE"):
            c.stats()


def test_a_server_that_closes_mid_request_fails_it_with_connection_lost_until_reconnect() -> None:
    def hang_up(conn: FakeConn) -> None:
        conn.welcome()
        conn.read()

    with FakeBroker(hang_up, serve_all()) as broker, Client(port=broker.port) as c:
        with pytest.raises(ConnectionLost, match="closed by broker"):
            c.status("x")
        with pytest.raises(ConnectionLost):
            c.stats()
        assert not c.connected
        c.reconnect()
        assert c.status("y").task_id == "y"


def test_a_request_with_no_reply_times_out_and_its_late_reply_is_dropped() -> None:
    def late(conn: FakeConn) -> None:
        conn.welcome()
        first, second = conn.read_n(2)  # the second arrives only after the first timed out
        conn.send(answer(first), answer(second))
        serve_all()(conn)

    with FakeBroker(late) as broker, Client(port=broker.port, timeout=0.2) as c:
        with pytest.raises(RequestTimeout):
            c.status("first")
        assert c.status("second").task_id == "second"
        assert c.connected


def test_a_claim_reply_may_take_the_timeout_plus_wait_ms() -> None:
    def slow_claim(conn: FakeConn) -> None:
        conn.welcome()
        req = conn.read()
        time.sleep(0.5)  # the broker's CLAIM waiting for work, longer than the client timeout
        conn.send(answer(req))  # type: ignore[arg-type]
        conn.read()

    with FakeBroker(slow_claim) as broker, Client(port=broker.port, timeout=0.2) as c:
        assert len(c.claim("w", ["q"], wait_ms=1500)) == 1


def test_closing_the_client_fails_pending_replies_with_connection_lost() -> None:
    def silent(conn: FakeConn) -> None:
        conn.welcome()
        while conn.read() is not None:
            pass

    with FakeBroker(silent) as broker:
        c = Client(port=broker.port)
        slot = c.send_async(m.Stats(id=0))
        c.close()
        with pytest.raises(ConnectionLost, match="closed by client"):
            slot.get()
        with pytest.raises(ConnectionLost):
            c.stats()
        c.close()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_connections_verify_the_broker_against_the_ca_file(host: str, tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    with FakeBroker(serve_all(), tls=server) as broker:
        with Client(host, broker.port, tls=True, ca_file=str(cert)) as c:
            assert c.welcome is not None and c.stats().pending == 1
            assert len(c.pipeline([m.Status(id=0, task_id=str(i)) for i in range(100)])) == 100
            answered: list[str] = []
            threads = [threading.Thread(target=lambda: answered.extend(c.status("x").task_id for _ in range(50)))
                       for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert answered == ["x"] * 200 and c.connected
        with pytest.raises(BrokerUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            Client(host, broker.port, tls=True)  # the system CAs do not know the self-signed cert


def test_the_client_works_under_gevent_monkey_patching() -> None:
    pytest.importorskip("gevent")
    script = f"""
from gevent import monkey; monkey.patch_all()
import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import gevent, gevent.threading
from test_client_unit import FakeBroker, serve_all
from transport import messages as m
from transport.client import Client
with FakeBroker(serve_all()) as broker, Client(port=broker.port) as c:
    assert isinstance(c._conn.reader, gevent.threading.Thread)
    replies = c.pipeline([m.Status(id=0, task_id=str(i)) for i in range(50)])
    assert [r.task.task_id for r in replies] == [str(i) for i in range(50)]
    jobs = [gevent.spawn(c.status, f"g{{i}}") for i in range(50)]
    gevent.joinall(jobs, raise_error=True)
    assert [j.value.task_id for j in jobs] == [f"g{{i}}" for i in range(50)]
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_not_found_is_a_broker_error_not_a_connection_error() -> None:
    assert issubclass(NotFound, BrokerError) and not issubclass(NotFound, ConnectionError)
    assert issubclass(ConnectionLost, ConnectionError) and issubclass(BrokerUnreachable, ClientError)
