"""What task code raises to steer its own retries (`Retry`, `Reject`), and what `TaskHandle.result()`
raises for a task that did not complete (`TaskFailed`, `TaskCancelled`).

They are the SDK's public vocabulary (re-exported by `actors.worker`); they live in their own module so
that `sdk.py` stays about submitting and awaiting, and `pool.py` about running.
"""

from __future__ import annotations

from transport import messages as m


class Retry(Exception):
    """Raised by a task to fail this attempt and ask for another one.

    `delay` is advisory: it is written into the error text, but the broker decides when the retry runs
    (`broker.retry_backoff_base_ms` × 2^(attempts-1), capped, with jitter) and whether one is left
    (`max_retries`). Holding or resubmitting the task to honour `delay` exactly would either keep a lease
    busy or give the retry a new task id that no `TaskHandle` follows, so the SDK does neither.
    """

    def __init__(self, message: str = "", delay: float | None = None) -> None:
        super().__init__(message, delay)
        self.message = message
        self.delay = delay

    def __str__(self) -> str:
        text = self.message or "task asked to be retried"
        if not self.delay:
            return text
        return f"{text} (requested delay {self.delay:g} s; the broker's backoff applies)"


class Reject(Exception):
    """Raised by a task to fail it for good (RESULT retry=false): retrying cannot help, e.g. bad input."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason or "task rejected"


class TaskFailed(Exception):
    """`TaskHandle.result()` of a task that ended `failed`; `error` is the worker's error text."""

    def __init__(self, task_id: str, error: str, info: m.TaskInfo | None = None) -> None:
        super().__init__(task_id, error)
        self.task_id = task_id
        self.error = error
        self.info = info

    def __str__(self) -> str:
        return f"task {self.task_id} failed: {self.error}"


class TaskCancelled(Exception):
    """`TaskHandle.result()` of a task that was cancelled before it ran."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"task {self.task_id} was cancelled"
