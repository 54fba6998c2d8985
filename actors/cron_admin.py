"""The queue actor's cron schedules (docs/protocol.md "Version 1.1"): SCHEDULE_ADD, SCHEDULE_REMOVE,
SCHEDULES, and firing on the actor's tick.

A fire submits one task with unique key `cron:<name>:<fire time>` and records the schedule with its new
`last_fire` (ScheduleSet) in the same WAL append as the task, so after any crash either both are there
or neither: a fire time is submitted exactly once, also across restarts. Fire times missed while the
broker was down coalesce into one (`actors.cron.due`), fired on the first tick after start-up.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from actors import cron
from storage.model import Schedule, ScheduleRemoved, ScheduleSet, apply_record
from transport.messages import Error, ErrorCode, Message, Ok, TaskSpec, priority_value
from transport.messages_ops import ScheduleAdd, ScheduleInfo, ScheduleList, ScheduleRemove, Schedules

log = logging.getLogger("tqbroker.cron")

MAX_SCHEDULES = 10_000
Actor = Any  # actors.queue.QueueActor


def _next(schedule: Schedule) -> float:
    return cron.next_fire(schedule.cron, schedule.tz, schedule.last_fire) if schedule.enabled else float("inf")


def _store(a: Actor, schedule: Schedule) -> None:
    record = ScheduleSet(schedule=schedule)
    apply_record(record, a.index.tasks, a.counters, a.ops.state)
    a._records.append(record)
    at = a.ops.next_fires[schedule.name] = _next(schedule)
    a.ops.cron_soonest = min(a.ops.cron_soonest, at)


def on_schedule_add(a: Actor, req: ScheduleAdd, reply_to: Any, now: float) -> Message:
    try:
        cron.check(req.cron, req.tz)
    except cron.CronError as exc:
        return Error(id=req.id, code=ErrorCode.BAD_REQUEST, message=f"{exc} - at $.{exc.field}")
    schedules = a.ops.state.schedules
    old = schedules.get(req.name)
    if old is None and len(schedules) >= MAX_SCHEDULES:
        return Error(id=req.id, code=ErrorCode.BAD_REQUEST,
                     message=f"at most {MAX_SCHEDULES} schedules; remove one (schedule rm NAME) first")
    last_fire = req.since if req.since is not None else now
    if old is not None and req.since is None and (old.cron, old.tz) == (req.cron, req.tz):
        last_fire = old.last_fire  # replacing the spec keeps its place: no second fire for a handled time
    spec = req.task
    _store(a, Schedule(name=req.name, cron=req.cron, tz=req.tz, kind=spec.kind, queue=spec.queue,
                       priority=priority_value(spec.priority), payload=spec.payload, max_retries=spec.max_retries,
                       lease_ms=spec.lease_ms, enabled=req.enabled, last_fire=last_fire))
    log.info("schedule %s set: %s (%s)", req.name, req.cron, req.tz, extra={"queue": spec.queue})
    return Ok(id=req.id)


def on_schedule_remove(a: Actor, req: ScheduleRemove, reply_to: Any, now: float) -> Message:
    if req.name not in a.ops.state.schedules:
        return Error(id=req.id, code=ErrorCode.NOT_FOUND, message=f"no schedule named {req.name}; list them with "
                                                                  "`schedules`")
    record = ScheduleRemoved(name=req.name)
    apply_record(record, a.index.tasks, a.counters, a.ops.state)
    a._records.append(record)
    a.ops.next_fires.pop(req.name, None)
    log.info("schedule %s removed", req.name)
    return Ok(id=req.id)


def on_schedules(a: Actor, req: Schedules, reply_to: Any, now: float) -> Message:
    infos = [ScheduleInfo(name=s.name, cron=s.cron, tz=s.tz, kind=s.kind, queue=s.queue, priority=s.priority,
                          enabled=s.enabled, last_fire=s.last_fire,
                          next_fire=_next(s) if s.enabled else None)
             for s in sorted(a.ops.state.schedules.values(), key=lambda s: s.name)]
    return ScheduleList(id=req.id, schedules=infos)


def fire_due(a: Actor, now: float) -> None:
    """Called on every tick: submits one task per schedule whose next fire time has come. Costs one
    comparison per tick until the soonest fire time comes."""
    if now < a.ops.cron_soonest:
        return
    next_fires = a.ops.next_fires
    if len(next_fires) != len(a.ops.state.schedules):  # after start-up (recovered schedules)
        for schedule in a.ops.state.schedules.values():
            next_fires.setdefault(schedule.name, _next(schedule))
    for name, at in list(next_fires.items()):
        if at > now:
            continue
        schedule = a.ops.state.schedules[name]
        fire_time = cron.due(schedule, now)
        if fire_time is None:
            next_fires[name] = _next(schedule)
            continue
        spec = TaskSpec(kind=schedule.kind, payload=schedule.payload, queue=schedule.queue,
                        priority=schedule.priority, max_retries=schedule.max_retries, lease_ms=schedule.lease_ms,
                        unique_key=cron.fire_key(name, fire_time))
        task_id, duplicate = a._submit_one(spec, now)
        _store(a, msgspec.structs.replace(schedule, last_fire=fire_time))
        log.info("schedule %s fired for %s%s", name, fire_time, " (its task was still live)" if duplicate else "",
                 extra={"task_id": task_id, "queue": schedule.queue})
    a.ops.cron_soonest = min(next_fires.values(), default=float("inf"))


HANDLERS: dict[type, Any] = {ScheduleAdd: on_schedule_add, ScheduleRemove: on_schedule_remove,
                             Schedules: on_schedules}
