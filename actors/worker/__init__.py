"""Workers and the Python SDK: `@task` functions, their submission and results, and the worker runtime.

Producers import `task` (and `connect` to pick a broker); `tqbroker worker MODULE...` runs the
tasks those modules define. See `actors/worker/sdk.py` for the payload/result wire format that other
languages can follow. The runtime (`runner`, `link`, `roles`, `pool`) is imported only by the worker
command, so producers do not pull in gevent or Pykka.
"""

from actors.worker.sdk import (
    Reject,
    Retry,
    Task,
    TaskCancelled,
    TaskFailed,
    TaskHandle,
    connect,
    decode_payload,
    decode_result,
    encode_payload,
    encode_result,
    get_client,
    registered_tasks,
    schedule,
    task,
)

__all__ = [
    "Reject",
    "Retry",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskHandle",
    "connect",
    "decode_payload",
    "decode_result",
    "encode_payload",
    "encode_result",
    "get_client",
    "registered_tasks",
    "schedule",
    "task",
]
