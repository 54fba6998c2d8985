"""How the queue actor words its answers, and how they leave it.

Pure functions over tasks, the task index and protocol messages (they change nothing), kept apart from
`actors.queue` so the actor reads as the state machine it drives. `send_replies` is the one place replies
are told to the connections' reply addresses (`actors.outbox.ConnectionOutbox`).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pykka

from actors.envelopes import Replies
from actors.task_index import TaskIndex
from storage.model import Counters, TaskRecord
from transport.messages import (
    Assigned,
    Error,
    ErrorCode,
    Message,
    Ok,
    StatsInfo,
    Submitted,
    SubmittedBatch,
    TaskInfo,
    TaskStatus,
    WorkerInfo,
)
from transport.messages_ops import Count

PendingReplies = dict[str, tuple[Any, list[Message]]]  # connection actor urn -> (reply_to, messages for it)

_ACKS = (Submitted, SubmittedBatch, Ok, Assigned, Count)


def task_info(task: TaskRecord) -> TaskInfo:
    return TaskInfo(
        task_id=task.task_id, queue=task.queue, kind=task.kind, priority=task.priority, state=task.state,
        attempts=task.attempts, max_retries=task.max_retries, submitted_at=task.submitted_at,
        run_at=task.run_at, started_at=task.started_at, finished_at=task.finished_at,
        worker_id=task.worker_id, result=task.result, error=task.error,
    )


def with_running(workers: list[WorkerInfo], by_worker: dict[str, set[str]]) -> list[WorkerInfo]:
    """The registry's worker list, each with the ids of the tasks it runs (only the queue actor knows)."""
    return [msgspec.structs.replace(w, running=sorted(by_worker.get(w.worker_id, ()))) for w in workers]


def stats_info(idx: TaskIndex, c: Counters, workers_alive: int, connections: int, uptime_s: float,
               paused: list[str] | None = None) -> StatsInfo:
    return StatsInfo(
        pending=idx.pending_total, scheduled=idx.scheduled_total, running=idx.running_total,
        completed_total=c.completed_total, failed_total=c.failed_total, cancelled_total=c.cancelled_total,
        submitted_total=c.submitted_total, workers_alive=workers_alive, connections=connections,
        uptime_s=uptime_s, queues=idx.queue_stats(), paused=paused or None,
    )


def queue_gauges(idx: TaskIndex) -> tuple[dict[str, int], dict[str, int]]:
    """(pending by priority tier over all queues, pending per queue) for the metrics gauges."""
    tiers = {"high": 0, "normal": 0, "low": 0}
    per_queue = {}
    for name, counts in idx.counts.items():
        v = counts.values
        per_queue[name] = v[0]
        tiers["high"] += v[3]
        tiers["normal"] += v[4]
        tiers["low"] += v[5]
    return tiers, per_queue


def finished_answer(request_id: int, task: TaskRecord, code: str | None, message: str) -> Message:
    """A request about a finished task: its status (`code` None) or the error `code` with `message`."""
    if code is None:
        return TaskStatus(id=request_id, task=task_info(task))
    return Error(id=request_id, code=code, message=message)


def writable_error(wal: Any) -> str:
    error = getattr(wal, "last_error", None)
    return getattr(error, "message", None) or "the write-ahead log cannot be written; see the broker log"


def refuse(message: Message, exc: Exception) -> Message:
    """An acknowledgement whose change did not reach the WAL becomes INTERNAL; reads pass unchanged."""
    if isinstance(message, _ACKS) and not (isinstance(message, Assigned) and not message.tasks):
        return Error(id=message.id, code=ErrorCode.INTERNAL, message=getattr(exc, "message", str(exc)))
    return message


def not_durable(replies: PendingReplies, exc: Exception) -> PendingReplies:
    """Every reply of a group whose fsync failed becomes INTERNAL: none of it may be taken as durable."""
    text = (f"{getattr(exc, 'message', None) or exc}; this change may not be durable: "
            "retry against a healthy broker")
    return {key: (ref, [m if isinstance(m, Error) else Error(id=m.id, code=ErrorCode.INTERNAL,
                                                              message=text) for m in msgs])
            for key, (ref, msgs) in replies.items()}


def send_replies(replies: PendingReplies) -> None:
    for reply_to, messages in replies.values():
        try:
            reply_to.tell(Replies(messages))
        except pykka.ActorDeadError:  # the connection closed meanwhile; its leases will expire
            pass
