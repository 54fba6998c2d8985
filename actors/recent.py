"""Recently finished tasks kept in memory, bounded in bytes: STATUS of a task that just finished (the
`handle.result()` pattern) is answered without reading task_history."""

from __future__ import annotations

from collections import OrderedDict

from storage.model import TaskRecord

TASK_OVERHEAD_BYTES = 600  # a TaskRecord struct, its id/strings and the dict slot, about, besides its blobs


def task_bytes(task: TaskRecord) -> int:
    """What keeping `task` costs, about: its blobs plus TASK_OVERHEAD_BYTES."""
    return TASK_OVERHEAD_BYTES + len(task.payload) + len(task.result or b"") + len(task.error or "")


class RecentTasks:
    """Finished tasks by id, oldest dropped first. Invariant: `bytes` (the sum of task_bytes over the
    tasks kept) is at most `max_bytes` after every `add`; a task bigger than that is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._tasks: OrderedDict[str, TaskRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> TaskRecord | None:
        return self._tasks.get(task_id)

    def add(self, task: TaskRecord) -> None:
        old = self._tasks.pop(task.task_id, None)
        if old is not None:
            self.bytes -= task_bytes(old)
        size = task_bytes(task)
        if size > self.max_bytes:
            return
        self._tasks[task.task_id] = task
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._tasks.popitem(last=False)
            self.bytes -= task_bytes(dropped)
