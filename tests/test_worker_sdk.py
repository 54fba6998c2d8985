"""Unit tests of the worker SDK and of running one task: the decorator, the payload/result wire format,
what SUBMIT / SUBMIT_BATCH carry, how `result()` maps terminal states, and the Outcome of each way a task
can end. Broker traffic goes to the scripted fake broker of the client tests, so no broker process runs.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the fixture tasks' kinds are named after `tests.workers_fixture_tasks`
    sys.path.insert(0, str(ROOT))

from actors.worker import (  # noqa: E402
    Reject,
    Retry,
    TaskCancelled,
    TaskFailed,
    TaskHandle,
    connect,
    decode_payload,
    decode_result,
    encode_payload,
    encode_result,
    registered_tasks,
    sdk,
    task,
)
from actors.worker.pool import MAX_ERROR_CHARS, execute, format_error  # noqa: E402
from actors.worker.runner import UsageError, WorkerConfig, import_task_modules  # noqa: E402
from tests import workers_fixture_tasks as fx  # noqa: E402
from tests.test_client_unit import FakeBroker, FakeConn, answer, serve_all  # noqa: E402
from transport import messages as m  # noqa: E402


@pytest.fixture
def fake_broker(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A fake broker answering everything, made the SDK's default connection; yields the requests seen."""
    seen: list[m.Message] = []
    with FakeBroker(serve_all(seen)) as broker:
        monkeypatch.setenv("TQ_BROKER__PORT", str(broker.port))
        connect()
        yield seen
        sdk.get_client().close()


# ---------------------------------------------------------------- the decorator


def test_a_task_kind_is_module_and_qualname_unless_a_name_is_given() -> None:
    assert fx.add.kind == "tests.workers_fixture_tasks.add"
    assert fx.echo.kind == "fixture.echo"
    assert registered_tasks()["fixture.echo"] is fx.echo


def test_calling_a_task_runs_the_function_locally() -> None:
    assert fx.add(2, b=3) == 5
    assert fx.add.__name__ == "add" and fx.add.__wrapped__(1) == 1  # type: ignore[attr-defined]


def test_the_bare_decorator_uses_the_defaults() -> None:
    @task
    def bare() -> None: ...

    assert (bare.queue, bare.priority, bare.max_retries, bare.lease_ms) == ("default", "normal", None, None)
    assert bare.kind.endswith("test_the_bare_decorator_uses_the_defaults.<locals>.bare")


@pytest.mark.parametrize("options, where", [
    ({"queue": "no spaces"}, "queue"), ({"priority": "urgent"}, "priority"), ({"priority": 300}, "priority"),
    ({"max_retries": 101}, "max_retries"), ({"lease_ms": 5}, "lease_ms"), ({"name": ""}, "kind"),
])
def test_task_options_are_checked_against_the_protocol_when_decorating(options: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError, match=rf"\$\.{where}"):
        task(**options)(lambda: None)


def test_two_functions_cannot_register_the_same_kind() -> None:
    with pytest.raises(ValueError, match="already registered"):
        task(name="fixture.echo")(lambda: None)


def test_a_task_pickles_by_reference_to_the_same_object() -> None:
    assert pickle.loads(pickle.dumps(fx.add)) is fx.add


# ---------------------------------------------------------------- payload and result format


def test_the_payload_is_a_msgpack_map_of_args_and_kwargs() -> None:
    payload = encode_payload((1, "a"), {"k": [1.5]})
    assert msgspec.msgpack.decode(payload) == {"args": [1, "a"], "kwargs": {"k": [1.5]}}
    assert decode_payload(payload) == ([1, "a"], {"k": [1.5]})


def test_a_foreign_payload_may_leave_out_either_key_or_be_empty() -> None:
    assert decode_payload(b"") == ([], {})
    assert decode_payload(msgspec.msgpack.encode({"args": [1]})) == ([1], {})
    assert decode_payload(msgspec.msgpack.encode({"kwargs": {"a": 1}})) == ([], {"a": 1})


def test_a_payload_that_is_not_the_documented_map_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="payload is not a MessagePack map"):
        decode_payload(msgspec.msgpack.encode([1, 2]))


def test_results_round_trip_as_plain_msgpack_values() -> None:
    assert decode_result(encode_result({"a": (1, 2)})) == {"a": [1, 2]}
    assert decode_result(b"") is None and decode_result(None) is None
    with pytest.raises(TypeError, match="not MessagePack-encodable"):
        encode_result(object())


# ---------------------------------------------------------------- submitting


def test_submit_sends_one_submit_with_the_task_options_and_the_encoded_arguments(fake_broker: list) -> None:
    before = time.time()
    handle = fx.always_fails.submit("boom", delay=60, unique_key="u1")
    sent = fake_broker[-1]
    assert isinstance(sent, m.Submit)
    spec = sent.task
    assert (spec.kind, spec.queue, spec.priority, spec.max_retries, spec.unique_key) == (
        "tests.workers_fixture_tasks.always_fails", "wtests", "normal", 2, "u1")
    assert decode_payload(spec.payload) == (["boom"], {})
    assert spec.run_at is not None and before + 60 <= spec.run_at <= time.time() + 60
    assert handle.task_id == f"t-{spec.kind}" and handle.duplicate is True  # the fake's canned answer


def test_submit_treats_run_at_delay_and_unique_key_as_options_and_apply_takes_any_kwargs(fake_broker: list) -> None:
    fx.echo.submit(1, run_at=1234.5, x=2)
    fx.echo.apply((), {"run_at": "a kwarg"}, priority="high")
    first, second = fake_broker[-2].task, fake_broker[-1].task  # type: ignore[attr-defined]
    assert first.run_at == 1234.5 and decode_payload(first.payload) == ([1], {"x": 2})
    assert second.run_at is None and second.priority == "high"
    assert decode_payload(second.payload) == ([], {"run_at": "a kwarg"})


def test_run_at_and_delay_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        fx.add.spec((1,), run_at=1.0, delay=1.0)


def test_submit_many_sends_one_batch_and_splits_args_and_kwargs_pairs(fake_broker: list) -> None:
    handles = fx.add.submit_many([(1, 2), ((3,), {"b": 4}), 5])
    sent = fake_broker[-1]
    assert isinstance(sent, m.SubmitBatch) and len(fake_broker) == 2  # HELLO, then one SUBMIT_BATCH
    assert [decode_payload(s.payload) for s in sent.tasks] == [([1, 2], {}), ([3], {"b": 4}), ([5], {})]
    assert len(handles) == 3 and all(isinstance(h, TaskHandle) for h in handles)


def test_the_default_connection_is_redialed_before_a_request_when_it_dropped(fake_broker: list) -> None:
    sdk.get_client().close()
    fx.add.submit(1)
    assert sum(isinstance(r, m.Hello) for r in fake_broker) == 2


# ---------------------------------------------------------------- results


def _status_script(*states: tuple[str, dict[str, Any]]) -> Any:
    """Answers STATUS with the given (state, extra fields) in turn, repeating the last."""
    replies = list(states)

    def script(conn: FakeConn) -> None:
        while (req := conn.read()) is not None:
            if isinstance(req, m.Status):
                state, extra = replies.pop(0) if len(replies) > 1 else replies[0]
                conn.send(m.TaskStatus(id=req.id, task=m.TaskInfo(
                    task_id=req.task_id, queue="q", kind="k", priority=150, state=state, attempts=1,
                    max_retries=3, submitted_at=1.0, run_at=1.0, **extra)))
            else:
                conn.send(answer(req))

    return script


def _handle_for(script: Any) -> tuple[FakeBroker, TaskHandle]:
    broker = FakeBroker(script)
    return broker, TaskHandle("t1", connect(port=broker.port))


def test_result_polls_until_completed_and_decodes_the_return_value() -> None:
    broker, handle = _handle_for(_status_script(("pending", {}), ("running", {}),
                                                ("completed", {"result": encode_result([1, "x"])})))
    with broker:
        assert handle.result(timeout=5) == [1, "x"]
        sdk.get_client().close()


def test_result_of_a_failed_task_raises_task_failed_with_the_worker_error() -> None:
    broker, handle = _handle_for(_status_script(("failed", {"error": "ValueError: boom"})))
    with broker:
        with pytest.raises(TaskFailed) as info:
            handle.result(timeout=5)
        assert info.value.error == "ValueError: boom" and info.value.info is not None
        sdk.get_client().close()


def test_result_of_a_cancelled_task_raises_task_cancelled() -> None:
    broker, handle = _handle_for(_status_script(("cancelled", {})))
    with broker:
        with pytest.raises(TaskCancelled):
            handle.result(timeout=5)
        sdk.get_client().close()


def test_result_raises_timeout_error_when_the_task_does_not_end_in_time() -> None:
    broker, handle = _handle_for(_status_script(("running", {})))
    with broker:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="state running"):
            handle.result(timeout=0.3)
        assert time.monotonic() - started < 1.0
        sdk.get_client().close()


# ---------------------------------------------------------------- running one task


def test_a_returned_value_becomes_an_ok_outcome_with_the_encoded_result() -> None:
    outcome = execute("t1", fx.add.kind, encode_payload((2,), {"b": 3}))
    assert outcome.ok and decode_result(outcome.result) == 5


def test_an_exception_becomes_a_retryable_failure_with_type_message_and_traceback_tail() -> None:
    outcome = execute("t1", fx.always_fails.kind, encode_payload(("boom",)))
    assert not outcome.ok and outcome.retry
    assert outcome.error is not None and outcome.error.startswith("ValueError: boom\nTraceback")
    assert "workers_fixture_tasks.py" in outcome.error


def test_the_retry_text_says_the_requested_delay_is_advisory() -> None:
    assert str(Retry("later", delay=2)) == "later (requested delay 2 s; the broker's backoff applies)"
    assert str(Retry()) == "task asked to be retried"


def test_retry_and_reject_map_to_retry_true_and_false(tmp_path: Path) -> None:
    retried = execute("t1", fx.retry_once.kind, encode_payload((str(tmp_path / "marker"),)))
    assert (retried.ok, retried.retry) == (False, True)
    assert retried.error is not None and retried.error.startswith("Retry: not ready yet (requested delay 0.1 s")
    rejected = execute("t2", fx.rejects.kind, encode_payload(("bad input",)))
    assert (rejected.ok, rejected.retry, rejected.error) == (False, False, "Reject: bad input")
    assert str(Reject()) == "task rejected"


def test_an_unknown_kind_fails_without_retry_and_names_what_is_served() -> None:
    outcome = execute("t1", "no.such.kind", b"")
    assert (outcome.ok, outcome.retry) == (False, False)
    assert outcome.error is not None and "no loaded module defines a task of kind 'no.such.kind'" in outcome.error
    assert "fixture.echo" in outcome.error


def test_a_bad_payload_or_an_unencodable_result_fails_without_retry() -> None:
    bad = execute("t1", fx.add.kind, b"\xc1")
    assert (bad.ok, bad.retry) == (False, False) and bad.error is not None and bad.error.startswith("BadPayload")
    unencodable = execute("t2", fx.returns_object.kind, b"")
    assert (unencodable.ok, unencodable.retry) == (False, False)
    assert unencodable.error is not None and "not MessagePack-encodable" in unencodable.error


def test_error_text_is_bounded_so_a_result_always_fits() -> None:
    try:
        raise RuntimeError("x" * 100_000)
    except RuntimeError as exc:
        text = format_error(exc)
    assert len(text) <= MAX_ERROR_CHARS and text.startswith("RuntimeError: xxx") and text.endswith("(truncated)")


# ---------------------------------------------------------------- the worker command line


def test_a_missing_task_module_is_a_usage_error_naming_it() -> None:
    with pytest.raises(UsageError, match="cannot import task module 'no_such_module_x'"):
        import_task_modules(["no_such_module_x"])


def test_invalid_queue_names_are_refused_before_connecting() -> None:
    with pytest.raises(UsageError, match="invalid queue name"):
        WorkerConfig(["tests.workers_fixture_tasks", "--queues", "ok,not ok"])


def test_the_registration_defaults_to_the_union_of_the_task_queues_and_lists_the_kinds() -> None:
    config = WorkerConfig(["tests.workers_fixture_tasks", "--name", "w1", "--concurrency", "3"])
    reg = config.registration({"a": fx.add, "b": fx.echo, "c": fx.pid})
    assert (reg.name, reg.queues, reg.concurrency) == ("w1", ["wtests"], 3)
    assert reg.metadata == {"kinds": "a,b,c", "pool": "threads", "modules": "tests.workers_fixture_tasks"}


def test_the_worker_command_exits_2_with_one_line_for_a_missing_module() -> None:
    proc = subprocess.run([sys.executable, "-m", "actors", "worker", "no_such_module_x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tqbroker worker: cannot import task module 'no_such_module_x': no module named 'no_such_module_x' "
        "(run from the directory that contains it, or set PYTHONPATH)"
    ]
