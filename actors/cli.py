"""The operator CLI: `stats`, `workers`, `status`, `cancel`, `submit` and `sql` against a running broker.

It is pure client code (transport only, never gevent), so it starts fast and runs wherever Python does.
Every failure is one `error: ...` line on stderr and exit status 1, so scripts can branch on `$?` and
people can read what went wrong; `--json` gives machine output on stdout. `sql` can fall back to an
offline reader of the history file (the `offline_query` hook of `main`) when the broker is down, which is
exactly when an operator most wants to look at history.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import difflib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from transport.client import Client
from transport.client_settings import ClientSettings, ClientSettingsError
from transport.errors import (
    BrokerError,
    BrokerUnreachable,
    ClientError,
    ConnectionLost,
    InvalidState,
    NotFound,
    RequestTimeout,
)
from transport.messages import priority_tier

OfflineQuery = Callable[[str, str | None], Any]  # (sql, data_dir or None) -> storage.errors.QueryResult


class CliError(Exception):
    """A failure already phrased for the operator: printed as `error: <message>`, exit status 1."""


# ---------------------------------------------------------------- output helpers


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value).replace("\n", "\\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """`columns` and `rows` as an aligned text table: a header, a rule, one line per row.

    Columns whose values are all numbers are right-aligned so magnitudes line up; everything else is
    left-aligned. None is an empty cell.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(col), *(len(row[i]) for row in cells)]) for i, col in enumerate(columns)]
    numeric = [
        bool(rows) and all(row[i] is None or _is_number(row[i]) for row in rows) for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        parts = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    """`key: value` lines with the values aligned; pairs whose value is None are left out."""
    shown = [(k, v) for k, v in pairs if v is not None]
    width = max((len(k) for k, _ in shown), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {v if isinstance(v, str) else _cell(v)}" for k, v in shown)


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="milliseconds")


def _ago(ts: float) -> str:
    return f"{max(time.time() - ts, 0.0):.1f}s ago"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # unreachable


def _payload_text(data: bytes | None) -> str | None:
    """A result payload as JSON when it is MessagePack (what workers send), else its size."""
    if data is None:
        return None
    try:
        return json.dumps(msgspec.msgpack.decode(data), default=str)
    except (msgspec.DecodeError, TypeError, ValueError):
        return f"<{len(data)} bytes>"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value, enc_hook=_json_default), default=_json_default))


# ---------------------------------------------------------------- commands


def _client(args: argparse.Namespace) -> Client:
    return args.settings.client(timeout=args.timeout, client_name="tqbroker-cli")


def cmd_stats(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        stats = client.stats()
    if args.json:
        return _print_json(stats)
    fields = ("pending", "scheduled", "running", "completed_total", "failed_total", "cancelled_total",
              "submitted_total", "workers_alive", "connections")
    print(_key_values([*((f, getattr(stats, f)) for f in fields), ("uptime", f"{stats.uptime_s:.0f}s"),
                       ("paused", ", ".join(stats.paused or []) or "none")]))
    if stats.queues:
        columns = ["queue", "pending", "scheduled", "running", "high", "normal", "low"]
        rows = [[name, *(getattr(q, c) for c in columns[1:])] for name, q in sorted(stats.queues.items())]
        print()
        print(format_table(columns, rows))


def cmd_workers(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        workers = client.workers()
    if args.json:
        return _print_json(workers)
    columns = ["worker_id", "name", "hostname", "pid", "alive", "concurrency", "running", "cpu%", "memory",
               "heartbeat", "queues"]
    rows = [[w.worker_id, w.name, w.hostname, w.pid, w.alive, w.concurrency, len(w.running), w.cpu_percent,
             _size(w.memory_bytes), _ago(w.last_heartbeat), w.queues] for w in workers]
    print(format_table(columns, rows))


def cmd_status(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        try:
            task = client.status(args.task_id)
        except NotFound:
            raise CliError(f"task not found: {args.task_id}") from None
    if args.json:
        return _print_json(task)
    print(_key_values([
        ("task_id", task.task_id), ("state", task.state), ("queue", task.queue), ("kind", task.kind),
        ("priority", f"{task.priority} ({priority_tier(task.priority)})"),
        ("attempts", f"{task.attempts} (max retries {task.max_retries})"),
        ("submitted_at", _when(task.submitted_at)), ("run_at", _when(task.run_at)),
        ("started_at", _when(task.started_at)), ("finished_at", _when(task.finished_at)),
        ("worker_id", task.worker_id), ("result", _payload_text(task.result)), ("error", task.error),
    ]))


def cmd_cancel(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        try:
            client.cancel(args.task_id)
        except NotFound:
            raise CliError(f"task not found: {args.task_id}") from None
        except InvalidState as exc:
            raise CliError(f"cannot cancel task {args.task_id}: {exc.message}") from None
    if args.json:
        return _print_json({"task_id": args.task_id, "state": "cancelled"})
    print(_key_values([("task_id", args.task_id), ("state", "cancelled")]))


def cmd_submit(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    payload = b"" if args.payload is _NO_PAYLOAD else msgspec.msgpack.encode(args.payload)
    run_at = time.time() + args.delay if args.delay is not None else None
    with _client(args) as client:
        sub = client.submit(args.kind, payload, queue=args.queue, priority=args.priority, run_at=run_at,
                            max_retries=args.max_retries, unique_key=args.unique_key)
        _warn_if_unserved(client, args.queue)
    if args.json:
        return _print_json({"task_id": sub.task_id, "duplicate": sub.duplicate})
    print(_key_values([("task_id", sub.task_id), ("duplicate", sub.duplicate)]))


def _warn_if_unserved(client: Client, queue: str) -> None:
    """One warning line on stderr when no live registered worker serves `queue` (the task waits)."""
    try:
        workers = client.workers()
    except (BrokerError, ClientError, RequestTimeout):
        return  # only a hint: the submit itself succeeded
    if not any(w.alive and queue in w.queues for w in workers):
        print(f"warning: no live worker is registered for queue {queue!r}; the task waits until one claims "
              f"from it (start one with `tqbroker worker MODULE --queues {queue}`; see `tqbroker workers`)",
              file=sys.stderr)


def cmd_sql(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    try:
        with _client(args) as client:
            result: Any = client.query_rows(args.query)
    except BrokerUnreachable as exc:
        if offline_query is None:
            raise
        print(f"note: {exc}; reading the history file instead", file=sys.stderr)
        try:
            result = offline_query(args.query, args.data_dir)
        except Exception as offline_exc:  # no file, locked, refused, timed out: each already one line
            raise CliError(getattr(offline_exc, "message", None) or str(offline_exc)) from None
    columns, rows = result.columns, result.rows
    if result.truncated:
        print(f"note: only the first {len(rows)} rows came back (at most 10,000 rows and one reply frame); "
              "narrow the query or page with LIMIT/OFFSET", file=sys.stderr)
    if args.json:
        return _print_json({"columns": columns, "rows": rows, "truncated": result.truncated})
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_json_default(v) if isinstance(v, bytes) else v for v in row] for row in rows)
        return None
    print(format_table(columns, rows))
    print(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")


# ---------------------------------------------------------------- arguments

_NO_PAYLOAD = object()  # "no --payload" must differ from `--payload null`


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _priority(text: str) -> int | str:
    if text in ("high", "normal", "low"):
        return text
    if text.isdigit() and 0 <= int(text) <= 255:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not high, normal, low or a number 0-255")


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The connection flags. Sub-commands get copies defaulting to SUPPRESS so that a flag given before
    the sub-command is not overwritten by the sub-command's default. Unset connection flags are filled
    in by `ClientSettings.resolve` (environment, then defaults)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--host", default=default(None), help="broker host (env TQ_BROKER__HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default(None),
                        help="broker port (env TQ_BROKER__PORT, default 6379)")
    parser.add_argument("--api-key", default=default(None), help="API key (env TQ_API_KEY)")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="connect with TLS (implied by --ca-file or TQ_TLS_CA)")
    parser.add_argument("--ca-file", default=default(None), metavar="FILE",
                        help="CA certificate to verify the broker with (env TQ_TLS_CA)")
    parser.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=default(10.0), metavar="SECONDS",
                        help="seconds to wait for a reply (default 10)")


def _task_id_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_id", metavar="TASK_ID", help="the id SUBMIT returned (see `submit` or `sql`)")


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", metavar="KIND", help="task kind a worker serves, e.g. billing.tasks.send_email")
    p.add_argument("--payload", type=_json_value, default=_NO_PAYLOAD, metavar="JSON",
                   help="JSON value, sent MessagePack-encoded (default: empty payload)")
    p.add_argument("--queue", default="default", help="queue to submit to (default: default)")
    p.add_argument("--priority", type=_priority, default="normal", metavar="P",
                   help="high, normal, low or 0-255 (default normal)")
    p.add_argument("--delay", type=float, metavar="SECONDS", help="run no earlier than this from now")
    p.add_argument("--max-retries", type=int, metavar="N",
                   help="failed attempts allowed after the first (default broker.default_max_retries)")
    p.add_argument("--unique-key", metavar="K",
                   help="while an unfinished task in the queue has this key, return its id instead")


def _sql_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", metavar="SQL", help="one read-only SELECT over the task_history table")
    p.add_argument("--csv", action="store_true", help="CSV output")
    p.add_argument("--data-dir", metavar="DIR",
                   help="with the broker stopped, read the history file in DIR (default persistence.data_dir, "
                        "env TQ_PERSISTENCE__DATA_DIR)")


def _no_args(p: argparse.ArgumentParser) -> None:
    """A command without arguments of its own (the connection flags only)."""


class Command(NamedTuple):
    """One CLI command: its one-line help, its handler and the function adding its own arguments."""

    help: str
    handler: Callable[[argparse.Namespace, OfflineQuery | None], None]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_args


# Adding a command is one entry here (plus its handler).
COMMANDS: dict[str, Command] = {
    "stats": Command("queue depths, totals and uptime", cmd_stats),
    "workers": Command("registered workers: liveness, load, running tasks", cmd_workers),
    "status": Command("one task's state, attempts, result or error", cmd_status, _task_id_args),
    "cancel": Command("cancel a pending or scheduled task", cmd_cancel, _task_id_args),
    "submit": Command("submit one task", cmd_submit, _submit_args),
    "sql": Command("read-only SQL over the task history (works with the broker stopped)", cmd_sql, _sql_args),
}


def unknown_command(word: str, commands: Sequence[str]) -> str:
    """The error for a command that does not exist: a suggestion when one is close, and the full list."""
    close = difflib.get_close_matches(word, commands, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown command {word!r}{hint} commands: {', '.join(commands)} (see `tqbroker --help`)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the operator commands, built from COMMANDS."""
    parser = argparse.ArgumentParser(prog="tqbroker", description="Inspect and drive a tqbroker broker.")
    _add_common(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in all_commands().items():
        command.arguments(sub.add_parser(name, parents=[common], help=command.help, description=command.help))
    return parser


def all_commands() -> dict[str, Command]:
    """COMMANDS and the queue operations' (actors.cli_queues, which builds on this module's helpers)."""
    from actors.cli_queues import QUEUE_COMMANDS

    return {**COMMANDS, **QUEUE_COMMANDS}


def client_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ClientSettings:
    """Where to find the broker: the connection flags, then `env` (default os.environ), then defaults."""
    return ClientSettings.resolve(args.host, args.port, args.api_key, args.tls, args.ca_file, env=env)


def main(argv: list[str] | None = None, offline_query: OfflineQuery | None = None) -> int:
    """Run one CLI command; the exit status: 0 ok, 1 failed, 2 bad usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "csv", False) and args.json:
            parser.error("--json and --csv cannot be used together")
        try:
            args.settings = client_settings(args)
        except ClientSettingsError as exc:
            parser.error(str(exc))
    except SystemExit as exc:  # argparse already printed usage and the problem
        return exc.code if isinstance(exc.code, int) else 2
    address = args.settings.address
    try:
        all_commands()[args.command].handler(args, offline_query)
        return 0
    except BrokenPipeError:  # `... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except CliError as exc:
        message = str(exc)
    except BrokerUnreachable as exc:
        message = str(exc)
    except RequestTimeout:
        message = f"no reply from the broker at {address} within {args.timeout:g}s"
    except ConnectionLost as exc:
        message = f"connection to the broker at {address} lost: {exc}"
    except ClientError as exc:
        message = f"unexpected reply from the broker at {address}: {exc}"
    except BrokerError as exc:
        message = f"{exc.message} ({exc.code})"
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
