"""Unit tests of the operator CLI: table formatting, argument parsing, and the error paths an operator
sees, driven through `main([...])` against the fake broker of the client tests (or nothing at all)."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from actors.cli import build_parser, client_settings, format_table, main
from storage.errors import QueryResult
from transport import messages as m

try:  # tests/ may or may not become a package; the fake broker lives next to this file either way
    from tests.test_client_unit import FakeBroker, FakeConn, free_port, serve_all
except ImportError:
    from test_client_unit import FakeBroker, FakeConn, free_port, serve_all  # type: ignore[no-redef]


# ---------------------------------------------------------------- format_table


def test_format_table_pads_every_column_to_its_widest_cell() -> None:
    out = format_table(["name", "state"], [["a", "pending"], ["longer-name", "ok"]])
    assert out.splitlines() == [
        "name         state",
        "-----------  -------",
        "a            pending",
        "longer-name  ok",
    ]


def test_format_table_right_aligns_numeric_columns_and_leaves_none_empty() -> None:
    out = format_table(["queue", "pending", "cpu"], [["q", 5, 1.5], ["default", 1234, None]])
    assert out.splitlines() == [
        "queue    pending    cpu",
        "-------  -------  -----",
        "q              5  1.500",
        "default     1234",
    ]


def test_format_table_with_no_rows_is_just_the_header() -> None:
    assert format_table(["a", "bb"], []).splitlines() == ["a  bb", "-  --"]


def test_format_table_renders_bools_lists_and_bytes_readably() -> None:
    out = format_table(["alive", "queues", "payload"], [[True, ["a", "b"], b"xyz"]])
    assert out.splitlines()[2] == "yes    a,b     <3 bytes>"


# ---------------------------------------------------------------- argument parsing


def test_connection_flags_default_to_the_environment() -> None:
    env = {"TQ_BROKER__HOST": "broker.local", "TQ_BROKER__PORT": "7000", "TQ_API_KEY": "sekret"}
    args = build_parser().parse_args(["stats"])
    settings = client_settings(args, env)
    assert (settings.host, settings.port, settings.api_key, args.json, args.timeout) == (
        "broker.local", 7000, "sekret", False, 10.0)


def test_connection_flags_work_before_and_after_the_subcommand() -> None:
    parser = build_parser()
    before = parser.parse_args(["--host", "h1", "--json", "workers"])
    after = parser.parse_args(["workers", "--host", "h2", "--port", "1", "--timeout", "2.5"])
    assert (client_settings(before, {}).address, before.json) == ("h1:6379", True)
    assert (client_settings(after, {}).address, after.timeout, after.json) == ("h2:1", 2.5, False)


def test_submit_parses_payload_priority_and_scheduling_options() -> None:
    args = build_parser().parse_args(["submit", "email", "--payload", '{"to": "x"}', "--queue", "mail",
                                        "--priority", "200", "--delay", "1.5", "--max-retries", "2",
                                        "--unique-key", "k"])
    assert (args.kind, args.payload, args.queue, args.priority) == ("email", {"to": "x"}, "mail", 200)
    assert (args.delay, args.max_retries, args.unique_key) == (1.5, 2, "k")
    assert build_parser().parse_args(["submit", "k", "--priority", "low"]).priority == "low"


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["status"],
    ["submit", "k", "--payload", "{not json"],
    ["submit", "k", "--priority", "urgent"],
    ["submit", "k", "--priority", "256"],
    ["sql", "SELECT 1", "--json", "--csv"],
    ["stats", "--port", "notaport"],
])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------- errors


def test_an_unreachable_broker_is_one_error_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["stats", "--port", str(port)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"error: broker not reachable at 127.0.0.1:{port}: Connection refused\n"


def test_sql_falls_back_to_the_offline_query_when_the_broker_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    asked: list[str] = []

    def offline(sql: str, data_dir: str | None) -> QueryResult:
        asked.append(sql)
        return QueryResult(["state", "n"], [["completed", 3]])

    assert main(["sql", "SELECT 1", "--port", str(free_port())], offline_query=offline) == 0
    out = capsys.readouterr()
    assert asked == ["SELECT 1"]
    assert out.out.splitlines() == ["state      n", "---------  -", "completed  3", "(1 row)"]
    assert "not reachable" in out.err


def test_status_of_an_unknown_task_says_task_not_found(capsys: pytest.CaptureFixture[str]) -> None:
    def not_found(conn: FakeConn) -> None:
        conn.welcome()
        while (req := conn.read()) is not None:
            conn.send(m.Error(id=req.id, code="NOT_FOUND", message="no such task"))  # type: ignore[union-attr]

    with FakeBroker(not_found) as broker:
        assert main(["status", "abc", "--port", str(broker.port)]) == 1
        assert main(["cancel", "abc", "--port", str(broker.port)]) == 1
    assert capsys.readouterr().err == "error: task not found: abc\n" * 2


def test_other_broker_errors_show_their_message_and_code(capsys: pytest.CaptureFixture[str]) -> None:
    def full(conn: FakeConn) -> None:
        conn.welcome()
        req = conn.read()
        conn.send(m.Error(id=req.id, code="QUEUE_FULL", message="queue depth 1000 reached"))  # type: ignore
        conn.read()

    with FakeBroker(full) as broker:
        assert main(["submit", "k", "--port", str(broker.port)]) == 1
    assert capsys.readouterr().err == "error: queue depth 1000 reached (QUEUE_FULL)\n"


# ---------------------------------------------------------------- commands


def test_submit_sends_the_payload_as_messagepack_and_prints_the_task_id(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[m.Message] = []
    with FakeBroker(serve_all(seen)) as broker:
        before = time.time()
        code = main(["submit", "email", "--payload", '{"to": ["a", 1]}', "--delay", "60", "--json",
                     "--priority", "high", "--port", str(broker.port), "--api-key", "k"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"task_id": "t-email", "duplicate": False}
    hello, submit, workers = seen
    assert isinstance(workers, m.Workers)  # asked after the submit: is anyone serving the queue?
    assert hello.api_key == "k" and hello.client == "tqbroker-cli"  # type: ignore[attr-defined]
    task = submit.task  # type: ignore[attr-defined]
    assert msgspec.msgpack.decode(task.payload) == {"to": ["a", 1]}
    assert task.priority == "high" and before + 60 <= task.run_at <= time.time() + 60


def test_stats_prints_totals_then_a_queue_table(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker(serve_all()) as broker:
        assert main(["stats", "--port", str(broker.port)]) == 0
        assert main(["stats", "--json", "--port", str(broker.port)]) == 0
    human, machine = capsys.readouterr().out.split("\n{", 1)
    lines = human.splitlines()
    assert lines[0] == "pending:         1" and "uptime:          10s" in lines
    assert lines[-1].split() == ["default", "1", "0", "0", "0", "1", "0"]
    assert json.loads("{" + machine)["queues"]["default"]["pending"] == 1


def test_status_prints_key_value_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker(serve_all()) as broker:
        assert main(["status", "t42", "--port", str(broker.port)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "task_id:      t42"
    assert "priority:     150 (normal)" in lines and not any(line.startswith("error") for line in lines)


def test_workers_and_sql_csv_print_their_rows(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker(serve_all()) as broker:
        assert main(["workers", "--port", str(broker.port)]) == 0
        workers = capsys.readouterr().out.splitlines()
        assert main(["sql", "SELECT 1", "--csv", "--port", str(broker.port)]) == 0
        assert capsys.readouterr().out == "sql,n\nSELECT 1,1\n"
    assert workers[0].split()[:3] == ["worker_id", "name", "hostname"]
    assert workers[2].split()[:6] == ["w1", "n", "h", "1", "yes", "2"]

