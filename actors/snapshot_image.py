"""The queue actor's snapshot image, copied a slice per message so a snapshot never pauses the hub.

Contract (why a fuzzy image recovers the exact state). At `start` the WAL has just rotated to segment S
and the image takes the counters and a list of references to the TaskRecord objects live at that point (one C
call). Each `copy_slice` later copies the next COPY_SLICE_TASKS of them (`msgspec.structs.replace`); other
messages run in between, so task i is copied at some time c_i after the rotation, with every change made
up to c_i. Recovery loads the image and replays every record of segments >= S with
`storage.model.apply_record(..., as_written=True)`. For each task:

- Every task live at the rotation is in the image, even one that left memory before its copy (the list
  holds the object; its copy is then terminal and replay's TaskFinished / DeadRemoved deletes it again).
  Tasks created after the rotation are not in the image: their TaskSubmitted inserts them.
- Every record is an assignment of absolute values (or a deletion) that the live actor made only when it
  happened (a TaskDied for a task that was not failed, a TasksRequeued / DeadRemoved naming exactly the
  dead tasks it changed). `as_written` applies them without re-checking those preconditions, so applying
  the records before c_i to the copy at c_i leaves each field at the value of its last setter before c_i,
  which is the copy's value: the task is as it was at c_i, and the records after c_i then change it as
  they changed the live one. The replayed state equals the live state.
- Counters are taken at the rotation and every record after it counts exactly once under `as_written`
  (TaskSubmitted, TaskChanged(retried), TaskFinished, TaskDied), so a change copied into the image is not
  counted twice.
- Queue settings and schedules are not in the image: the rotated segment starts with `QueueOps.image`.
"""

from __future__ import annotations

import msgspec

from storage.model import Counters, TaskRecord

COPY_SLICE_TASKS = 20_000  # tasks copied per queue-actor message: ~7 ms at 100-byte payloads


class SnapshotImage:
    """References to the tasks live at one WAL rotation, handed out as copies slice by slice."""

    def __init__(self) -> None:
        self._tasks: list[TaskRecord] = []

    def start(self, live: dict[str, TaskRecord], counters: Counters) -> tuple[Counters, int]:
        """Begins a new image (dropping any unfinished one); returns the counters and task count."""
        self._tasks = list(live.values())
        return msgspec.structs.replace(counters), len(self._tasks)

    def copy_slice(self, start: int) -> list[TaskRecord]:
        """Copies of the image's tasks from `start` (at most COPY_SLICE_TASKS; empty past the end)."""
        copy = msgspec.structs.replace
        return [copy(t) for t in self._tasks[start:start + COPY_SLICE_TASKS]]

    def clear(self) -> None:
        """The snapshot was written or failed: the references go (finished tasks can be freed)."""
        self._tasks = []
