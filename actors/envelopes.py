"""Messages the actors tell each other (never on the wire).

A request that needs an answer carries `reply_to`, its connection's `ConnectionOutbox`
(`actors.outbox`): the owner of the state tells the answer straight back, so the hot path is tell-only
(no actor waits on another's answer), and a reply with nothing queued ahead of it leaves without a hop
through the connection's actor.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from storage.model import Counters, TaskRecord
from transport.messages import Message, WorkerInfo


class Replies(Struct, gc=False):
    """Responses for one connection, sent with one send; `close` closes it afterwards."""

    messages: list[Message]
    close: bool = False


class QueueRequests(Struct, gc=False):
    """All queue-bound requests decoded from one `recv()` of one connection."""

    requests: list[Message]
    reply_to: Any
    nbytes: int = 0  # size of the frames they came in: bounds the WAL bytes they can add


class RenewLeases(Struct, gc=False):
    """A heartbeat, after the registry recorded it: renew the leases the worker holds."""

    request_id: int
    worker_id: str
    active: list[str]
    reply_to: Any


class ReclaimWorker(Struct, gc=False):
    """A worker is gone: `uncount` for DEREGISTER (attempt given back), not for a dead worker."""

    worker_id: str
    uncount: bool
    request_id: int = 0
    reply_to: Any = None


class FillStats(Struct, gc=False):
    """A STATS request on its way registry → queue, carrying what the registry and server know."""

    request_id: int
    workers_alive: int
    connections: int
    reply_to: Any


class FillWorkers(Struct, gc=False):
    """A WORKERS request on its way registry → queue, which fills in each worker's running tasks."""

    request_id: int
    workers: list[WorkerInfo]
    reply_to: Any


class WorkerSeen(Struct, gc=False):
    """The queue saw a CLAIM from a worker id it had not seen: the registry auto-registers it.

    `recovered`: the worker holds tasks recovered at start-up; it gets a grace period to reconnect.
    """

    worker_id: str
    recovered: bool = False


class ForgetClaimer(Struct, gc=False):
    """Queue → registry: the connection on which this worker id first CLAIMed closed and it holds no task.

    The registry forgets the worker only if it never REGISTERed nor HEARTBEATed (a claim-only client).
    """

    worker_id: str


class RegistryRequest(Struct, gc=False):
    """A REGISTER, DEREGISTER, HEARTBEAT, STATS or WORKERS request from a connection."""

    request: Message
    reply_to: Any
    connections: int = 0


class ConnectionClosed(Struct, gc=False):
    """A connection went away: withdraw its waiting claims so no task is assigned to nobody."""

    reply_to: Any


class Tick(Struct, gc=False):
    """A timer fired: promote due scheduled tasks, expire waiting claims, flush history."""


class ExpireLeases(Struct, gc=False):
    """From the lease watcher: return every run whose lease has expired."""


class CheckWorkers(Struct, gc=False):
    """From the registry's own timer: declare dead the workers that stopped heartbeating."""


class DeadlineTick(Struct, gc=False):
    """From the registry's own short timer: declare dead the workers whose deadline has passed."""


class Shutdown(Struct, gc=False):
    """Answer waiting claims with an empty ASSIGNED and refuse new work with SHUTTING_DOWN."""


class UseQueue(Struct, gc=False):
    """Wiring, to the worker registry: the queue actor's ref (it starts after the registry)."""

    queue: Any


# ---------------------------------------------------------------- snapshots and history (compactor, history link)


class TakeSnapshot(Struct):
    """Timer or shutdown: write a snapshot now."""


class Compact(Struct):
    """Timer: apply history retention and CHECKPOINT."""


class PrepareSnapshot(Struct):
    """Asked of the queue actor: rotate the WAL and start an image of the tasks live at that point."""


class SnapshotData(Struct, gc=False):
    """The start of an image: counters at the WAL rotation, `task_count` tasks to fetch with CopySlice.
    `finished` is history batch `finished_batch`, committed with the snapshot."""

    counters: Counters
    wal_segment: int
    finished_batch: str
    finished: list[TaskRecord]
    task_count: int


class CopySlice(Struct):
    """Asked of the queue actor: copies of the image's tasks `start` .. `start + COPY_SLICE_TASKS`."""

    start: int


class SnapshotSlice(Struct, gc=False):
    """Shallow copies made in the queue actor's handler (payloads are immutable bytes, shared)."""

    tasks: list[TaskRecord]


class SnapshotTaken(Struct, gc=False):
    """Told to the queue actor: segments before `wal_segment` are covered; batch `finished_batch` is in
    history (unless `error`)."""

    wal_segment: int
    finished_batch: str
    error: str | None = None


class HistoryWritten(Struct, gc=False):
    """A history batch finished writing (`error` is None on success)."""

    batch_id: str
    error: str | None = None
