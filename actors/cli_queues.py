"""CLI commands for queue operations (protocol 1.1): `queues`, `pause`, `resume`, `purge`, `ratelimit`,
`tasks`, `dead`, `requeue`, `dead-delete`, `schedules`, `schedule add|rm`.

Same rules as `actors.cli`: `--json` for machine output, every failure one `error: ...` line and exit
status 1. `QUEUE_COMMANDS` joins `actors.cli.COMMANDS` through `actors.cli.all_commands`.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from actors.cli import (
    CliError,
    Command,
    OfflineQuery,
    _client,
    _json_value,
    _print_json,
    _priority,
    _when,
    format_table,
)
from actors.cli import _add_common as add_common
from transport.errors import NotFound
from transport.messages import TaskSpec


def cmd_queues(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        queues = client.queues()
    if args.json:
        return _print_json(queues)
    columns = ["queue", "pending", "scheduled", "running", "dead", "paused", "rate_limit"]
    rows = [[q.name, q.pending, q.scheduled, q.running, q.dead, q.paused,
             "off" if q.rate_limit is None else f"{q.rate_limit:g}/s"] for q in queues]
    print(format_table(columns, rows))


def _setting(args: argparse.Namespace, done: str, call: Any) -> None:
    with _client(args) as client:
        call(client)
    if args.json:
        return _print_json({"queue": args.queue, "done": done})
    print(f"queue {args.queue}: {done}")


def cmd_pause(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    _setting(args, "paused", lambda c: c.pause(args.queue))


def cmd_resume(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    _setting(args, "resumed", lambda c: c.resume(args.queue))


def cmd_ratelimit(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    rate = args.rate
    done = "rate limit off" if rate is None else f"rate limit {rate:g} claims/s"
    _setting(args, done, lambda c: c.rate_limit(args.queue, rate))


def cmd_purge(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        count = client.purge(args.queue, scheduled=args.scheduled)
    if args.json:
        return _print_json({"queue": args.queue, "purged": count})
    print(f"queue {args.queue}: {count} task{'' if count == 1 else 's'} cancelled")


def cmd_dead(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        page = client.dead(queue=args.queue, kind=args.kind, limit=args.limit, after=args.after,
                           newest_first=args.newest)
    if args.json:
        return _print_json(page)
    columns = ["task_id", "queue", "kind", "attempts", "failed_at", "error"]
    rows = [[t.task_id, t.queue, t.kind, t.attempts, _when(t.finished_at), t.error] for t in page.tasks]
    print(format_table(columns, rows))
    if page.next is not None:
        print(f"(more: --after {page.next})")


def cmd_tasks(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        page = client.browse(args.state, queue=args.queue, kind=args.kind, limit=args.limit, cursor=args.cursor,
                             newest_first=args.newest)
    if args.json:
        return _print_json(page)
    columns = ["task_id", "queue", "kind", "state", "priority", "attempts", "submitted_at", "error"]
    rows = [[t.task_id, t.queue, t.kind, t.state, t.priority, t.attempts, _when(t.submitted_at), t.error]
            for t in page.tasks]
    print(format_table(columns, rows))
    if page.next is not None:
        print(f"(more: --cursor {page.next})")


def _dead_targets(args: argparse.Namespace) -> dict[str, Any]:
    if (args.task_id is None) == (not args.all):
        raise CliError("give either TASK_ID or --all (optionally with --queue and --kind)")
    if args.task_id is not None and (args.queue or args.kind):
        raise CliError("--queue and --kind go with --all, not with a TASK_ID")
    return {"task_id": args.task_id, "all": args.all, "queue": args.queue, "kind": args.kind}


def _dead_op(args: argparse.Namespace, verb: str, call: Any) -> None:
    targets = _dead_targets(args)
    with _client(args) as client:
        try:
            count = call(client, targets)
        except NotFound:
            raise CliError(f"task {args.task_id} is not in the dead set (list it with `dead`)") from None
    if args.json:
        return _print_json({verb: count})
    print(f"{count} dead task{'' if count == 1 else 's'} {verb}")


def cmd_requeue(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    _dead_op(args, "requeued", lambda c, t: c.requeue(t.pop("task_id"), **t))


def cmd_dead_delete(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    _dead_op(args, "deleted", lambda c, t: c.delete_dead(t.pop("task_id"), **t))


def cmd_schedules(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        schedules = client.schedules()
    if args.json:
        return _print_json(schedules)
    columns = ["name", "cron", "tz", "kind", "queue", "enabled", "last_fire", "next_fire"]
    rows = [[s.name, s.cron, s.tz, s.kind, s.queue, s.enabled, _when(s.last_fire), _when(s.next_fire)]
            for s in schedules]
    print(format_table(columns, rows))


def cmd_schedule(args: argparse.Namespace, offline_query: OfflineQuery | None) -> None:
    with _client(args) as client:
        if args.action == "rm":
            try:
                client.schedule_remove(args.name)
            except NotFound:
                raise CliError(f"no schedule named {args.name} (list them with `schedules`)") from None
        else:
            payload = b"" if args.payload is None else msgspec.msgpack.encode(args.payload)
            spec = TaskSpec(kind=args.kind, payload=payload, queue=args.queue, priority=args.priority)
            client.schedule_add(args.name, args.cron, spec, tz=args.tz)
    done = "removed" if args.action == "rm" else "set"
    if args.json:
        return _print_json({"schedule": args.name, "done": done})
    print(f"schedule {args.name}: {done}")


def _rate(text: str) -> float | None:
    if text == "off":
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not 0 < rate <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of claims per second (0-1000000] or off")
    return rate


def _queue_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("queue", metavar="QUEUE", help="the queue's name")


def _ratelimit_args(p: argparse.ArgumentParser) -> None:
    _queue_arg(p)
    p.add_argument("rate", type=_rate, metavar="N|off", help="claims per second across all workers, or off")


def _purge_args(p: argparse.ArgumentParser) -> None:
    _queue_arg(p)
    p.add_argument("--scheduled", action="store_true", help="also the scheduled ones")


def _page_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", help="only this queue")
    p.add_argument("--kind", help="only this kind")
    p.add_argument("--limit", type=int, default=100, choices=range(1, 1001), metavar="N", help="1-1000")
    p.add_argument("--newest", action="store_true", help="newest first")


def _dead_args(p: argparse.ArgumentParser) -> None:
    _page_args(p)
    p.add_argument("--after", type=int, metavar="CURSOR", help="the cursor a previous page printed")


def _tasks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default="pending", help="the state to list (default pending)",
                   choices=["scheduled", "pending", "running", "dead", "completed", "failed", "cancelled"])
    _page_args(p)
    p.add_argument("--cursor", help="the cursor a previous page printed")


def _schedule_args(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="add|rm")
    add = actions.add_parser("add", help="add or replace a schedule")
    add_common(add, suppress=True)
    add.add_argument("name", metavar="NAME", help="the schedule's name")
    add.add_argument("--cron", required=True, metavar="EXPR", help='5 fields, e.g. "*/5 * * * *"')
    add.add_argument("--tz", default="UTC", metavar="ZONE", help="IANA time zone (default UTC)")
    add.add_argument("--kind", required=True, metavar="KIND", help="the task kind to submit")
    add.add_argument("--queue", default="default", help="the queue to submit to (default default)")
    add.add_argument("--payload", type=_json_value, metavar="JSON", help="JSON value, sent MessagePack-encoded")
    add.add_argument("--priority", type=_priority, default="normal", metavar="P", help="high, normal, low or 0-255")
    rm = actions.add_parser("rm", help="remove a schedule")
    add_common(rm, suppress=True)
    rm.add_argument("name", metavar="NAME", help="the schedule's name")


def _dead_pick_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_id", nargs="?", metavar="TASK_ID", help="one dead task (or --all)")
    p.add_argument("--all", action="store_true", help="every dead task (matching --queue/--kind)")
    p.add_argument("--queue", help="with --all: only this queue")
    p.add_argument("--kind", help="with --all: only this kind")


# The queue-operation commands (protocol 1.1), merged into actors.cli's table by `all_commands()`.
QUEUE_COMMANDS: dict[str, Command] = {
    "queues": Command("each queue: counts, dead, paused, rate limit", cmd_queues),
    "pause": Command("stop handing out a queue's tasks (submits still accepted)", cmd_pause, _queue_arg),
    "resume": Command("hand out a paused queue's tasks again", cmd_resume, _queue_arg),
    "ratelimit": Command("at most N claims/s from a queue, or off", cmd_ratelimit, _ratelimit_args),
    "purge": Command("cancel a queue's pending tasks", cmd_purge, _purge_args),
    "dead": Command("tasks that failed for good (the dead set)", cmd_dead, _dead_args),
    "tasks": Command("a page of tasks in one state", cmd_tasks, _tasks_args),
    "schedules": Command("cron schedules", cmd_schedules),
    "schedule": Command("add or remove a cron schedule", cmd_schedule, _schedule_args),
    "requeue": Command("dead tasks back to pending, same id", cmd_requeue, _dead_pick_args),
    "dead-delete": Command("delete dead tasks (history keeps them)", cmd_dead_delete, _dead_pick_args),
}
