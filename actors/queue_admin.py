"""The queue actor's handlers for the protocol 1.1 queue operations (docs/protocol.md "Version 1.1").

Functions over the QueueActor's state, registered in its dispatch table (`QueueActor._request_handlers`)
so they run inside the actor like every other request: each change is a `storage.model` record applied
with `apply_record` and queued for the actor's one WAL append, and the reply leaves only after it.
"""

from __future__ import annotations

import logging
from typing import Any

from actors import cron_admin
from actors import task_states as states
from actors.answers import task_info
from actors.browse import live_page
from storage.model import DeadRemoved, QueueSettingsSet, TaskRecord, TasksRequeued, TaskState, apply_record
from transport.messages import Error, ErrorCode, Message, Ok, TaskInfo
from transport.messages_ops import (
    Browse,
    Count,
    DeadList,
    DeadPage,
    DeleteDead,
    Pause,
    Purge,
    QueueInfo,
    QueueList,
    Queues,
    RateLimit,
    Requeue,
    Resume,
    TaskPage,
)

log = logging.getLogger("tqbroker.queue")

REQUEUE_RECORD_IDS = 5_000  # task ids per TasksRequeued record (all records of a request share one write)

Actor = Any  # actors.queue.QueueActor (not imported: it imports this module)


# ---------------------------------------------------------------- settings: pause, resume, rate limit


def _set(a: Actor, record: QueueSettingsSet, now: float) -> None:
    apply_record(record, a.index.tasks, a.counters, a.ops.state)
    a.ops.settings_applied(record.queue, now)
    a._records.append(record)
    a.metrics.set_queue_paused(record.queue, record.paused)
    a.waiters.serve(record.queue, now)  # resumed or un-limited: waiting claims get work at once


def on_pause(a: Actor, req: Pause, reply_to: Any, now: float) -> Message:
    _set(a, a.ops.change(req.queue, now, paused=True), now)
    log.info("queue paused", extra={"queue": req.queue})
    return Ok(id=req.id)


def on_resume(a: Actor, req: Resume, reply_to: Any, now: float) -> Message:
    _set(a, a.ops.change(req.queue, now, paused=False), now)
    log.info("queue resumed", extra={"queue": req.queue})
    return Ok(id=req.id)


def on_rate_limit(a: Actor, req: RateLimit, reply_to: Any, now: float) -> Message:
    _set(a, a.ops.change(req.queue, now, rate_limit=req.per_second), now)
    log.info("queue rate limit %s", f"{req.per_second}/s" if req.per_second else "off", extra={"queue": req.queue})
    return Ok(id=req.id)


# ---------------------------------------------------------------- purge


def on_purge(a: Actor, req: Purge, reply_to: Any, now: float) -> Message:
    """Cancels every pending (and with `scheduled`, scheduled) task of the queue; they go to history."""
    wanted = (TaskState.PENDING, TaskState.SCHEDULED) if req.scheduled else (TaskState.PENDING,)
    doomed = [t for t in a.index.tasks.values() if t.queue == req.queue and t.state in wanted]
    for task in doomed:
        a._change(task, states.cancel(task, now))
    log.info("queue purged: %d tasks cancelled", len(doomed), extra={"queue": req.queue, "count": len(doomed)})
    return Count(id=req.id, count=len(doomed))


# ---------------------------------------------------------------- dead set: requeue, delete, list


def _chosen_dead(a: Actor, req: Requeue | DeleteDead) -> list[TaskRecord] | Error:
    if req.task_id is not None:
        task = a.index.tasks.get(req.task_id)
        if task is None or req.task_id not in a.ops.dead:
            return Error(id=req.id, code=ErrorCode.NOT_FOUND,
                         message=f"task {req.task_id} is not in the dead set; list it with `dead`")
        return [task]
    if not req.all:
        return Error(id=req.id, code=ErrorCode.BAD_REQUEST,
                     message="give task_id, or all: true (optionally with queue and kind)")
    return a.ops.matching_dead(a.index.tasks, req.queue, req.kind)


def on_requeue(a: Actor, req: Requeue, reply_to: Any, now: float) -> Message:
    """Dead tasks become pending with a fresh attempt count under the same id."""
    chosen = _chosen_dead(a, req)
    if isinstance(chosen, Error):
        return chosen
    queues = set()
    for start in range(0, len(chosen), REQUEUE_RECORD_IDS):
        part = chosen[start:start + REQUEUE_RECORD_IDS]
        record = TasksRequeued(task_ids=[t.task_id for t in part], first_seq=a.ready_seq + 1, at=now)
        a.ready_seq += len(part)
        apply_record(record, a.index.tasks, a.counters, a.ops.state)
        a._records.append(record)
        a.ops.remove_dead(record.task_ids)
        for task in part:
            a.index.enter(task)
            a.payload_bytes += len(task.payload)  # live again (an operator's requeue is not refused for bytes)
            if task.unique_key is not None and (task.queue, task.unique_key) not in a.index.unique:
                a.index.add_unique(task)  # a newer live task with its key keeps it
            queues.add(task.queue)
    for queue in queues:
        a.waiters.serve(queue, now)
    if chosen:
        log.info("requeued %d dead tasks", len(chosen), extra={"count": len(chosen)})
    return Count(id=req.id, count=len(chosen))


def remove_dead(a: Actor, task_ids: list[str]) -> None:
    """Deletes dead tasks from memory (their history rows stay)."""
    if task_ids:
        record = DeadRemoved(task_ids=task_ids)
        apply_record(record, a.index.tasks, a.counters, a.ops.state)
        a._records.append(record)
        a.ops.remove_dead(task_ids)


def on_delete_dead(a: Actor, req: DeleteDead, reply_to: Any, now: float) -> Message:
    chosen = _chosen_dead(a, req)
    if isinstance(chosen, Error):
        return chosen
    remove_dead(a, [t.task_id for t in chosen])
    return Count(id=req.id, count=len(chosen))


def on_dead_list(a: Actor, req: DeadList, reply_to: Any, now: float) -> Message:
    """A page of the dead set (at most `dead_set_max` entries, so a scan is bounded)."""
    tasks, after = a.index.tasks, req.after
    page: list[TaskInfo] = []
    order = reversed(a.ops.dead.items()) if req.newest_first else iter(a.ops.dead.items())
    last_seq = None
    for task_id, seq in order:
        if after is not None and (seq >= after if req.newest_first else seq <= after):
            continue
        task = tasks.get(task_id)
        if task is None or (req.queue is not None and task.queue != req.queue) or (
                req.kind is not None and task.kind != req.kind):
            continue
        if len(page) == req.limit:
            return DeadPage(id=req.id, tasks=page, next=last_seq)
        page.append(task_info(task))
        last_seq = seq
    return DeadPage(id=req.id, tasks=page)


def on_browse(a: Actor, req: Browse, reply_to: Any, now: float) -> Message:
    """A page of live tasks (scheduled, pending, running, dead); terminal states are read from history
    by the connection (actors.browse_history) and never reach the actor."""
    after = None
    if req.cursor is not None:
        if not (req.cursor.startswith("l:") and req.cursor[2:].isdigit()):
            return Error(id=req.id, code=ErrorCode.BAD_REQUEST,
                         message=f"cursor {req.cursor[:40]!r} is not one this broker gave for state {req.state}; "
                                 "pass the `next` of the previous page")
        after = int(req.cursor[2:])
    tasks, next_key = live_page(a.index, a.ops.dead, req.state, req.queue, req.kind, req.limit, after,
                                req.newest_first)
    return TaskPage(id=req.id, tasks=[task_info(t) for t in tasks],
                    next=None if next_key is None else f"l:{next_key}")


def on_queues(a: Actor, req: Queues, reply_to: Any, now: float) -> Message:
    dead = a.ops.dead_counts(a.index.tasks)
    names = sorted(set(a.index.counts) | set(a.ops.settings) | set(dead))
    infos = []
    for name in names:
        counts = a.index.counts.get(name)
        pending, scheduled, running = counts.values[:3] if counts is not None else (0, 0, 0)
        settings = a.ops.settings.get(name)
        infos.append(QueueInfo(name=name, pending=pending, scheduled=scheduled, running=running,
                               dead=dead.get(name, 0), paused=settings is not None and settings.paused,
                               rate_limit=settings.rate_limit if settings is not None else None))
    return QueueList(id=req.id, queues=infos)


# ---------------------------------------------------------------- hooks called by the queue actor


def task_died(a: Actor, task_id: str, now: float) -> None:
    """A task failed for good and stayed in the dead set: drop the oldest past the count bound."""
    a.ops.add_dead(task_id)
    if len(a.ops.dead) > a.ops.dead_max:
        evict(a, now)


def evict(a: Actor, now: float) -> None:
    """Drops dead tasks past `persistence.dead_set_max` or older than `dead_set_retention_days`."""
    gone = a.ops.over_bounds(a.index.tasks, now)
    if gone:
        remove_dead(a, gone)
        a.metrics.dead_evicted.inc(len(gone))
        log.warning("dead set: %d oldest dead tasks dropped (bounds persistence.dead_set_max=%d, "
                    "dead_set_retention_days); their history rows stay", len(gone), a.ops.dead_max,
                    extra={"count": len(gone)})


def on_tick(a: Actor, now: float, maintenance: bool) -> None:
    """Every tick: fire due cron schedules; serve claims waiting on rate-limited queues that have a token
    again; publish the throttled-claims count. On maintenance ticks: evict dead tasks past their retention."""
    cron_admin.fire_due(a, now)
    for queue in list(a.ops.throttled_queues(a.index, now)):
        a.waiters.serve(queue, now)
    if a.ops.throttled:
        a.metrics.claims_throttled.inc(a.ops.throttled)
        a.ops.throttled = 0
    if maintenance:
        for queue, settings in a.ops.settings.items():
            a.metrics.set_queue_paused(queue, settings.paused)
        if a.ops.dead:
            evict(a, now)


HANDLERS: dict[type, Any] = {
    Pause: on_pause, Resume: on_resume, RateLimit: on_rate_limit, Purge: on_purge, Requeue: on_requeue,
    DeleteDead: on_delete_dead, DeadList: on_dead_list, Queues: on_queues, Browse: on_browse,
    **cron_admin.HANDLERS,
}
