"""What a task id says about when its task can have existed (no DuckDB here: the broker imports it)."""

from __future__ import annotations

# Task ids (actors.task_states.TaskIds): 11 hex digits of the broker run's start in unix ms, 10 random hex
# digits, then a hex counter of at least 6 digits. A task is submitted after its run started, so it
# finished after the id's time; the slack covers a wall clock stepped back while the broker ran.
ID_TIME_DIGITS = 11
ID_MIN_LENGTH = 27
ID_MAX_LENGTH = 40
ID_CLOCK_SLACK_S = 3600.0
_HEX = frozenset("0123456789abcdef")


def id_time(task_id: str) -> float | None:
    """The unix time (seconds) a task id of this broker's format encodes, or None if it is not one."""
    if not ID_MIN_LENGTH <= len(task_id) <= ID_MAX_LENGTH or not _HEX.issuperset(task_id):
        return None
    return int(task_id[:ID_TIME_DIGITS], 16) / 1000.0
