"""BROWSE of terminal states (completed, failed, cancelled): a page of `task_history`, newest or oldest
`finished_at` first, with a keyset cursor `h:<finished_at µs>:<task_id>` (no OFFSET: a deep page costs
what the first does, given DuckDB's zone maps on finished_at).

Runs on the connection's greenlet through the same read-only QUERY path (`run_query`: one SELECT, read-only
transaction, `api.query_timeout_secs`), never in the queue actor. Values put into the SQL are validated
(queue names match `[A-Za-z0-9_.:-]`, the cursor's number is digits) or quoted (`kind`, the cursor's id).
"""

from __future__ import annotations

from collections.abc import Callable

from storage.errors import QueryResult
from transport.messages import Error, ErrorCode, Message, TaskInfo
from transport.messages_ops import Browse, TaskPage

RunQuery = Callable[[str], QueryResult]

_COLUMNS = ("task_id, queue, kind, priority, state, attempts, max_retries, epoch_us(submitted_at), "
            "epoch_us(run_at), epoch_us(started_at), epoch_us(finished_at), worker_id, error")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _seconds(us: int | None) -> float | None:
    return None if us is None else us / 1_000_000


def history_sql(req: Browse) -> str | None:
    """The SELECT for one page (limit + 1 rows, to know whether there is a next); None for a bad cursor."""
    where = [f"state = {_quote(req.state)}"]
    if req.queue is not None:
        where.append(f"queue = {_quote(req.queue)}")
    if req.kind is not None:
        where.append(f"kind = {_quote(req.kind)}")
    direction = "DESC" if req.newest_first else "ASC"
    if req.cursor is not None:
        parts = req.cursor.split(":", 2)
        if len(parts) != 3 or parts[0] != "h" or not parts[1].isdigit():
            return None
        us, task_id = int(parts[1]), _quote(parts[2])
        op = "<" if req.newest_first else ">"
        where.append(f"(epoch_us(finished_at) {op} {us} OR (epoch_us(finished_at) = {us} AND task_id {op} {task_id}))")
    return (f"SELECT {_COLUMNS} FROM task_history WHERE {' AND '.join(where)} "
            f"ORDER BY finished_at {direction}, task_id {direction} LIMIT {req.limit + 1}")


def history_page(run_query: RunQuery, req: Browse) -> Message:
    sql = history_sql(req)
    if sql is None:
        return Error(id=req.id, code=ErrorCode.BAD_REQUEST,
                     message=f"cursor {(req.cursor or '')[:40]!r} is not one this broker gave for state "
                             f"{req.state}; pass the `next` of the previous page")
    rows = run_query(sql).rows
    tasks = [TaskInfo(task_id=r[0], queue=r[1], kind=r[2], priority=r[3], state=r[4], attempts=r[5],
                      max_retries=r[6], submitted_at=_seconds(r[7]) or 0.0, run_at=_seconds(r[8]) or 0.0,
                      started_at=_seconds(r[9]), finished_at=_seconds(r[10]), worker_id=r[11], error=r[12])
             for r in rows[:req.limit]]
    last = rows[req.limit - 1] if len(rows) > req.limit else None
    return TaskPage(id=req.id, tasks=tasks, next=None if last is None else f"h:{last[10]}:{last[0]}")
