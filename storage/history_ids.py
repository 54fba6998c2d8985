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


# history_keys.id_key: (the id's unix ms - KEY_EPOCH_MS) << 24 | its counter (capped at 2**24 - 1), a BIGINT
# that grows with the id, so DuckDB's exact min/max of each row group narrows an id_key = $1 scan to the
# row groups written while tasks of that age were finishing (task_id strings keep only an 8-byte prefix in
# their statistics, which a whole broker run shares). Ids keep their key until 2041.
KEY_EPOCH_MS = 1_704_067_200_000  # 2024-01-01 UTC
KEY_COUNTER_BITS = 24
KEY_MAX_OFFSET_MS = (1 << (63 - KEY_COUNTER_BITS)) - 1
_OFFSET_SQL = f"(TRY_CAST(('0x' || substr(task_id, 1, 11)) AS BIGINT) - {KEY_EPOCH_MS})"
KEY_SQL = (  # the same as id_key, in DuckDB SQL over a column `task_id` (backfills the table in a migration)
    f"CASE WHEN regexp_full_match(task_id, '[0-9a-f]{{27,40}}') AND {_OFFSET_SQL} BETWEEN 0 AND {KEY_MAX_OFFSET_MS} "
    f"THEN {_OFFSET_SQL} * {1 << KEY_COUNTER_BITS} + CASE WHEN length(task_id) > 27 "
    f"THEN {(1 << KEY_COUNTER_BITS) - 1} ELSE TRY_CAST(('0x' || substr(task_id, 22)) AS BIGINT) END END"
)


def id_key(task_id: str) -> int | None:
    """history_keys.id_key of `task_id`, or None if it is not of this broker's format (or out of range)."""
    seconds = id_time(task_id)
    if seconds is None:
        return None
    offset = int(task_id[:ID_TIME_DIGITS], 16) - KEY_EPOCH_MS
    if not 0 <= offset <= KEY_MAX_OFFSET_MS:
        return None
    counter = int(task_id[ID_MIN_LENGTH - 6:], 16) if len(task_id) == ID_MIN_LENGTH else (1 << KEY_COUNTER_BITS) - 1
    return offset << KEY_COUNTER_BITS | counter
