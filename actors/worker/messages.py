"""Messages between the worker runtime's actors (actors/worker/roles.py, heartbeat.py, runner.py).

Each actor's `on_receive` accepts only these (and its own private ticks); queries that `ask` for an
answer name what they return.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from actors.worker.pool import Outcome
from transport import messages as m


class Run(Struct, frozen=True):
    tasks: list[m.Assignment]
    reply_to: Any


class SlotFreed(Struct, frozen=True):
    count: int = 1


class Finished(Struct, frozen=True):
    outcome: Outcome
    final: bool = False  # the broker will not retry this task if it fails (its last attempt)
    attempts: int = 0  # attempts made so far, this one included


class Started(Struct, frozen=True):
    task_id: str
    lease_s: float | None


class Settled(Struct, frozen=True):
    task_ids: list[str]


class Deliver(Struct, frozen=True):
    outcome: Outcome


class Stop(Struct, frozen=True):
    """Stop claiming (claimer) / starting tasks (executor) / heartbeating (heartbeat)."""


class WhenDone(Struct, frozen=True):
    """Resolve `future` once nothing is left (executor: running tasks; reporter: undelivered results)."""

    future: Any


class RunningTasks(Struct, frozen=True):
    """Executor query: the sorted ids of the tasks still running (list[str])."""


class UndeliveredCount(Struct, frozen=True):
    """Reporter query: how many results are still waiting to reach the broker (int)."""

