"""Cron fire times, pure (time is passed in): standard 5-field expressions in a named time zone, through
the maintained `cronsim` library (DST gaps and repeats handled there).

Contracts: `due` returns at most one fire time per call, the latest one not after `now` and after the
schedule's `last_fire`, so fire times missed while the broker was down coalesce into one; a fire time is
an exact minute, and `fire_key` turns it into the unique key that makes its task exactly one.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from storage.model import Schedule

_EPSILON = dt.timedelta(microseconds=1)


class CronError(ValueError):
    """A cron expression or time zone this broker cannot use; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise CronError("tz", f"unknown time zone {tz!r}; use an IANA name such as UTC or Europe/Berlin") from None


def check(cron: str, tz: str) -> None:
    """Raises CronError unless `cron` is a valid 5-field expression and `tz` a known time zone."""
    tzinfo = zone(tz)
    if len(cron.split()) != 5:
        raise CronError("cron", f"cron {cron!r} must have 5 fields: minute hour day-of-month month day-of-week")
    try:
        CronSim(cron, dt.datetime.now(tzinfo))
    except CronSimError as exc:
        raise CronError("cron", f"bad cron expression {cron!r}: {exc}") from None


def next_fire(cron: str, tz: str, after: float) -> float:
    """The first fire time strictly after `after` (unix seconds)."""
    start = dt.datetime.fromtimestamp(after, zone(tz))
    return next(CronSim(cron, start)).timestamp()


def latest_fire(cron: str, tz: str, now: float) -> float:
    """The latest fire time at or before `now`."""
    start = dt.datetime.fromtimestamp(now, zone(tz)) + _EPSILON  # cronsim's reverse walk starts below its start
    return next(CronSim(cron, start, reverse=True)).timestamp()


def due(schedule: Schedule, now: float) -> float | None:
    """The fire time to submit now, if any: the latest one in (last_fire, now], however many were missed."""
    if not schedule.enabled or next_fire(schedule.cron, schedule.tz, schedule.last_fire) > now:
        return None
    return latest_fire(schedule.cron, schedule.tz, now)


def fire_key(name: str, fire_time: float) -> str:
    return f"cron:{name}:{int(fire_time)}"
