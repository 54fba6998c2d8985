"""Cron schedules: the pure fire-time logic with explicit times, then a real broker firing exactly once per
fire time, coalescing missed ones, across kill -9 and SIGTERM restarts (no waiting for a minute boundary:
the schedules fire daily at a time in the past, with `since` days before it)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, BrokerProcess
from helpers import wait_for

from actors import cron
from actors.worker import decode_payload
from storage.model import Schedule
from transport.errors import BadRequest, NotFound
from transport.messages import TaskSpec

UTC = dt.UTC


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def schedule(expr: str, last_fire: float, tz: str = "UTC", enabled: bool = True) -> Schedule:
    return Schedule(name="s", cron=expr, tz=tz, kind="k", queue="q", priority=150, payload=b"", max_retries=None,
                    lease_ms=None, enabled=enabled, last_fire=last_fire)


# ------------------------------------------------------------------ fire times


def test_the_next_fire_time_is_strictly_after_the_given_time() -> None:
    assert cron.next_fire("*/5 * * * *", "UTC", at("2026-01-01T00:05:00")) == at("2026-01-01T00:10:00")
    assert cron.next_fire("*/5 * * * *", "UTC", at("2026-01-01T00:04:59")) == at("2026-01-01T00:05:00")


def test_nothing_is_due_before_the_next_fire_time_and_it_is_due_at_it() -> None:
    s = schedule("* * * * *", at("2026-01-01T00:00:00"))
    assert cron.due(s, at("2026-01-01T00:00:59.9")) is None
    assert cron.due(s, at("2026-01-01T00:01:00")) == at("2026-01-01T00:01:00")
    assert cron.due(s, at("2026-01-01T00:01:00.5")) == at("2026-01-01T00:01:00")


def test_fire_times_missed_for_days_coalesce_into_the_latest_one() -> None:
    s = schedule("*/5 * * * *", at("2026-01-01T00:00:00"))
    assert cron.due(s, at("2026-01-04T13:07:00")) == at("2026-01-04T13:05:00")


def test_a_disabled_schedule_is_never_due() -> None:
    assert cron.due(schedule("* * * * *", at("2026-01-01T00:00:00"), enabled=False), at("2026-02-01T00:00:00")) is None


def test_fire_times_follow_the_time_zone_across_a_dst_change() -> None:
    s = schedule("30 9 * * *", at("2026-03-28T12:00:00"), tz="Europe/Berlin")  # CET (+1) until Mar 29, then CEST
    assert cron.next_fire(s.cron, s.tz, s.last_fire) == at("2026-03-29T07:30:00")
    assert cron.next_fire(s.cron, s.tz, at("2026-03-27T12:00:00")) == at("2026-03-28T08:30:00")


@pytest.mark.parametrize(("expr", "tz", "field"), [("* * * *", "UTC", "cron"), ("* * * * * *", "UTC", "cron"),
                                                   ("61 * * * *", "UTC", "cron"), ("* * * * *", "Mars/Base", "tz")])
def test_a_bad_expression_or_zone_is_refused_naming_the_field(expr: str, tz: str, field: str) -> None:
    with pytest.raises(cron.CronError) as caught:
        cron.check(expr, tz)
    assert caught.value.field == field


def test_the_unique_key_of_a_fire_is_the_schedule_and_its_minute() -> None:
    assert cron.fire_key("nightly", at("2026-01-01T00:00:00")) == f"cron:nightly:{int(at('2026-01-01T00:00:00'))}"


# ------------------------------------------------------------------ a broker


def daily_in_the_past() -> tuple[str, float]:
    """A daily cron expression whose latest fire time was about two hours ago, and that fire time."""
    fire = dt.datetime.fromtimestamp(time.time() - 7200, UTC).replace(second=0, microsecond=0)
    return f"{fire.minute} {fire.hour} * * *", fire.timestamp()


def tasks_of(client, kind: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [t.task_id for t in client.browse("pending", queue="cronq").tasks if t.kind == kind]


def after_a_tick(client, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Returns once the broker's tick (which also fires schedules) has run: a task due in 10 ms is pending."""
    client.submit(kind, b"", queue="cronq", run_at=time.time() + 0.01)
    wait_for(lambda: tasks_of(client, kind))


def test_missed_fire_times_fire_once_and_never_again_across_kill_9_and_sigterm_restarts(
    broker: BrokerProcess,
) -> None:
    c = broker.client()
    expr, fire = daily_in_the_past()
    c.schedule_add("nightly", expr, TaskSpec(kind="report", queue="cronq"), since=fire - 3 * 86400)
    [task_id] = wait_for(lambda: tasks_of(c, "report"))  # three missed days, one task
    [info] = c.schedules()
    assert info.last_fire == fire and info.next_fire == fire + 86400
    [job] = c.claim("w", ["cronq"], max_tasks=1, wait_ms=0)
    c.complete("w", job.task_id, b"")  # its unique key is free now: only the schedule's last_fire stops a refire
    broker.kill()
    broker.restart()
    c = broker.client()
    after_a_tick(c, "marker")
    assert tasks_of(c, "report") == [] and c.schedules()[0].last_fire == fire
    assert broker.terminate() == 0
    broker.restart()
    c = broker.client()
    after_a_tick(c, "marker2")
    assert tasks_of(c, "report") == [] and c.status(task_id).state == "completed"


def test_a_schedule_added_now_does_not_fire_for_times_before_it(broker: BrokerProcess) -> None:
    c = broker.client()
    expr, fire = daily_in_the_past()
    c.schedule_add("nightly", expr, TaskSpec(kind="report", queue="cronq"))
    after_a_tick(c, "marker")
    assert tasks_of(c, "report") == [] and c.schedules()[0].next_fire == fire + 86400


def test_schedules_are_listed_removed_and_validated(broker: BrokerProcess) -> None:
    c = broker.client()
    c.schedule_add("a", "*/5 * * * *", TaskSpec(kind="k"), tz="Europe/Berlin", enabled=False)
    [info] = c.schedules()
    assert (info.name, info.cron, info.tz, info.enabled, info.next_fire) == ("a", "*/5 * * * *", "Europe/Berlin",
                                                                             False, None)
    with pytest.raises(BadRequest, match=r"5 fields.*\$\.cron"):
        c.schedule_add("b", "* * *", TaskSpec(kind="k"))
    with pytest.raises(BadRequest, match=r"unknown time zone.*\$\.tz"):
        c.schedule_add("b", "* * * * *", TaskSpec(kind="k"), tz="Nowhere/City")
    c.schedule_remove("a")
    assert c.schedules() == []
    with pytest.raises(NotFound, match="no schedule named a"):
        c.schedule_remove("a")
    broker.restart()
    assert broker.client().schedules() == []


# ------------------------------------------------------------------ the SDK


def test_a_worker_serving_a_cron_task_stores_its_schedule_at_start(broker: BrokerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({"PYTHONPATH": str(ROOT), "TQ_BROKER__PORT": str(broker.port)})
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "actors", "worker", "tests.cron_fixture_tasks"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        c = broker.client()
        [info] = wait_for(lambda: c.schedules(), timeout=20)
        assert (info.name, info.cron, info.tz, info.queue) == (
            "tests.cron_fixture_tasks.nightly_report", "0 3 * * *", "Europe/Berlin", "cronq")
    finally:
        worker.kill()
        worker.wait(timeout=10)


def test_schedule_stores_a_call_with_its_arguments_and_a_bad_cron_on_a_task_is_refused(
    broker: BrokerProcess,
) -> None:
    from actors.worker import schedule, task
    from tests.cron_fixture_tasks import add

    c = broker.client()
    expr, fire = daily_in_the_past()
    schedule("sum", expr, add, 2, b=3, client=c)
    assert [s.name for s in c.schedules()] == ["sum"]
    c.schedule_add("sum", expr, add.spec((2,), {"b": 3}), since=fire - 60)  # make the latest fire time due
    wait_for(lambda: tasks_of(c, "tests.cron_fixture_tasks.add"))
    [job] = c.claim("w", ["cronq"], max_tasks=1, wait_ms=0)
    assert decode_payload(job.payload) == ([2], {"b": 3})
    with pytest.raises(ValueError, match="5 fields"):
        task(cron="* *")(lambda: None)
