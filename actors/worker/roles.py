"""The worker's actors for claiming, running and reporting (the link and heartbeat have their own modules).

```
ClaimerActor ──Run(tasks, reply_to=claimer)──▶ ExecutorActor ──Started──▶ HeartbeatActor
     ▲                                            │    │                       ▲
     └──────────────SlotFreed────────────────────┘    └──Deliver(outcome)──▶ ReporterActor ──Settled──┘
```
Each actor owns its own state and is told, never asked, on the hot path (as in the broker). Slot
accounting is credit based: the claimer starts with `concurrency` credits, spends one per assigned task
and gets one back per `SlotFreed`, so it can never claim more than it can run. The heartbeat's `active`
list is every task started and not yet settled: a finished task whose RESULT is still undelivered (the
broker is restarting) keeps its lease renewed until the RESULT goes through or is refused.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
import pykka
from msgspec import Struct

from actors.dispatch import Dispatching, handles
from actors.worker.link import Connected, Lost, tell_quietly
from actors.worker.messages import (
    Deliver,
    Finished,
    Run,
    RunningTasks,
    Settled,
    SlotFreed,
    Started,
    Stop,
    UndeliveredCount,
    WhenDone,
)
from actors.worker.pool import Backend, Outcome, unknown_kind
from transport import messages as m
from transport.client import Client
from transport.errors import (
    BadRequest,
    BrokerError,
    ClientError,
    NotFound,
    NotLeased,
    RequestTimeout,
    ShuttingDown,
)

log = logging.getLogger("tqbroker.worker")

RETRY_AFTER_S = 1.0


class _Again(Struct, frozen=True):
    pass


class _Flush(Struct, frozen=True):
    pass


# ---------------------------------------------------------------- claiming


class ClaimerActor(Dispatching, pykka.ThreadingActor):
    """Long-polls CLAIM on its own connection for as many tasks as there are free slots."""

    def __init__(self, claims: Client, link: Any, executor: Any, queues: list[str], concurrency: int,
                 wait_ms: int) -> None:
        super().__init__()
        self.claims = claims
        self.link = link
        self.executor = executor
        self.queues = queues
        self.wait_ms = wait_ms
        self.free = concurrency
        self.generation = 0
        self.worker_id = ""
        self.max_batch = 1
        self.connected = False
        self.stopped = False
        self._queued = False  # a _Again is in the mailbox already

    @handles(_Again)
    def _on_again(self, _message: _Again) -> None:
        self._queued = False
        self._claim()

    @handles(SlotFreed)
    def _on_slot_freed(self, message: SlotFreed) -> None:
        self.free += message.count
        self._again()

    @handles(Connected)
    def _on_connected(self, message: Connected) -> None:
        self.generation, self.worker_id = message.generation, message.worker_id
        self.max_batch, self.connected = max(1, message.max_batch_claim), True
        self._again()

    @handles(Stop)
    def _on_stop(self, _message: Stop) -> None:
        self.stopped = True

    def _again(self, after_s: float = 0.0) -> None:
        if after_s:
            gevent.spawn_later(after_s, tell_quietly, self.actor_ref, _Again())
        elif not self._queued:
            self._queued = True
            self.actor_ref.tell(_Again())

    def _claim(self) -> None:
        if self.stopped or not self.connected or self.free <= 0:
            return
        try:
            count = min(self.free, self.max_batch)
            tasks = self.claims.claim(self.worker_id, self.queues, count, self.wait_ms)
        except ClientError as exc:
            if not self.stopped:
                self.connected = False
                self.link.tell(Lost(generation=self.generation, source="claims", reason=str(exc)))
            return
        except RequestTimeout:
            log.warning("CLAIM got no answer in time; claiming again", extra={"worker_id": self.worker_id})
            self._again()
            return
        except ShuttingDown:
            self._again(RETRY_AFTER_S)  # the broker closes the connection next; the link re-dials
            return
        except BrokerError as exc:
            log.error("CLAIM refused: %s; trying again in %.0f s", exc, RETRY_AFTER_S,
                      extra={"worker_id": self.worker_id})
            self._again(RETRY_AFTER_S)
            return
        if tasks:
            self.free -= len(tasks)
            self.executor.tell(Run(tasks=tasks, reply_to=self.actor_ref))
        self._again()


# ---------------------------------------------------------------- running


class ExecutorActor(Dispatching, pykka.ThreadingActor):
    """Starts each assigned task on the backend (one greenlet waits for each) and routes its outcome."""

    def __init__(self, backend: Backend, kinds: dict[str, Any], reporter: Any, heartbeat: Any) -> None:
        super().__init__()
        self.backend = backend
        self.kinds = kinds  # kind -> its sdk.Task (for its lease_ms)
        self.served = sorted(kinds)
        self.reporter = reporter
        self.heartbeat = heartbeat
        self.running: dict[str, gevent.Greenlet] = {}
        self.accepting = True
        self.waiters: list[Any] = []

    @handles(Finished)
    def _on_finished(self, message: Finished) -> None:
        self._finished(message)

    @handles(Run)
    def _on_run(self, message: Run) -> None:
        for assignment in message.tasks:
            self._start(assignment, message.reply_to)

    @handles(WhenDone)
    def _on_when_done(self, message: WhenDone) -> None:
        self.waiters.append(message.future)
        self._maybe_done()

    @handles(Stop)
    def _on_stop(self, _message: Stop) -> None:
        self.accepting = False
        self._maybe_done()

    @handles(RunningTasks)
    def _on_running_tasks(self, _message: RunningTasks) -> list[str]:
        return sorted(self.running)

    def _start(self, a: m.Assignment, claimer: Any) -> None:
        extra = {"task_id": a.task_id, "queue": a.queue}
        if not self.accepting:
            log.info("task claimed during shutdown, not started; DEREGISTER returns it", extra=extra)
            return
        task = self.kinds.get(a.kind)
        if task is None:
            log.error("task of unknown kind %r failed", a.kind, extra=extra)
            self.reporter.tell(Deliver(unknown_kind(a.task_id, a.kind, self.served)))
            claimer.tell(SlotFreed())
            return
        log.debug("task %s started (attempt %d)", a.kind, a.attempt, extra=extra)
        lease_s = task.lease_ms / 1000 if task.lease_ms else None
        self.heartbeat.tell(Started(task_id=a.task_id, lease_s=lease_s))
        self.running[a.task_id] = gevent.spawn(self._run, a, claimer)

    def _run(self, a: m.Assignment, claimer: Any) -> None:
        """In its own greenlet: blocks only itself while the backend runs the task."""
        try:
            outcome = self.backend.run(a.task_id, a.kind, a.payload)
        except Exception as exc:  # the backend itself failed (not user code, which `execute` wraps)
            log.exception("running task %s failed in the worker itself", a.task_id)
            outcome = Outcome(task_id=a.task_id, ok=False, retry=True, error=f"WorkerError: {exc!r}")
        final = a.max_retries is not None and a.attempt > a.max_retries
        tell_quietly(self.actor_ref, Finished(outcome, final=final, attempts=a.attempt))
        tell_quietly(claimer, SlotFreed())

    def _finished(self, msg: Finished) -> None:
        outcome = msg.outcome
        self.running.pop(outcome.task_id, None)
        extra = {"task_id": outcome.task_id, "seconds": round(outcome.seconds, 4)}
        error = (outcome.error or "").partition("\n")[0]
        if outcome.ok:
            log.debug("task completed", extra=extra)
        elif outcome.retry and msg.final:
            log.info("task failed after %d %s; giving up: %s", msg.attempts,
                     "attempt" if msg.attempts == 1 else "attempts", error, extra=extra)
        else:
            log.info("task failed (%s): %s", "will retry" if outcome.retry else "no retry", error, extra=extra)
        self.reporter.tell(Deliver(outcome))
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not self.running and self.waiters:
            for future in self.waiters:
                future.set(True)
            self.waiters.clear()


# ---------------------------------------------------------------- results


class ReporterActor(Dispatching, pykka.ThreadingActor):
    """Sends RESULTs, pipelined, on the control connection; keeps the undelivered ones for after a
    reconnect. NOT_LEASED (the lease moved on while we were away) and NOT_FOUND are logged and dropped."""

    def __init__(self, control: Client, link: Any, heartbeat: Any) -> None:
        super().__init__()
        self.control = control
        self.link = link
        self.heartbeat = heartbeat
        self.undelivered: dict[str, Outcome] = {}
        self.generation = 0
        self.worker_id = ""
        self.connected = False
        self.retry_queued = False
        self.flush_queued = False
        self.waiters: list[Any] = []

    @handles(Deliver)
    def _on_deliver(self, message: Deliver) -> None:
        self.undelivered[message.outcome.task_id] = message.outcome
        if not self.flush_queued:  # behind every Deliver already in the mailbox: one pipeline for all
            self.flush_queued = True
            self.actor_ref.tell(_Flush())

    @handles(_Flush)
    def _on_flush(self, _message: _Flush) -> None:
        self.flush_queued = False
        self._flush()

    @handles(_Again)
    def _on_again(self, _message: _Again) -> None:
        self.retry_queued = False
        self._flush()

    @handles(Connected)
    def _on_connected(self, message: Connected) -> None:
        self.generation, self.worker_id, self.connected = message.generation, message.worker_id, True
        self._flush()

    @handles(WhenDone)
    def _on_when_done(self, message: WhenDone) -> None:
        self.waiters.append(message.future)
        self._flush()

    @handles(UndeliveredCount)
    def _on_undelivered_count(self, _message: UndeliveredCount) -> int:
        return len(self.undelivered)

    def _flush(self) -> None:
        if self.undelivered and self.connected:
            self._send()
        if not self.undelivered and self.waiters:
            for future in self.waiters:
                future.set(True)
            self.waiters.clear()

    def _send(self) -> None:
        batch = list(self.undelivered.values())
        requests = [m.Result(id=0, worker_id=self.worker_id, task_id=o.task_id, ok=o.ok, result=o.result,
                             error=o.error, retry=o.retry) for o in batch]
        try:
            replies = self.control.pipeline(requests, return_exceptions=True)
        except ClientError as exc:
            replies = [exc] * len(batch)
        settled: list[str] = []
        lost: ClientError | None = None
        later = False
        for outcome, reply in zip(batch, replies, strict=True):
            extra = {"task_id": outcome.task_id, "worker_id": self.worker_id}
            if isinstance(reply, m.Ok):
                settled.append(outcome.task_id)
            elif isinstance(reply, (NotLeased, NotFound)):
                log.warning("result dropped: %s", reply, extra=extra)
                settled.append(outcome.task_id)
            elif isinstance(reply, BadRequest):  # resending the same RESULT cannot succeed
                log.error("result refused and dropped: %s", reply, extra=extra)
                settled.append(outcome.task_id)
            elif isinstance(reply, ClientError):
                lost = reply
            else:  # INTERNAL (disk full), SHUTTING_DOWN, a timeout: the broker may take it later
                log.warning("result not accepted yet (%s); will resend", reply, extra=extra)
                later = True
        for task_id in settled:
            del self.undelivered[task_id]
        if settled:
            self.heartbeat.tell(Settled(task_ids=settled))
        if lost is not None:
            self.connected = False
            log.info("%d result(s) kept for delivery after reconnecting", len(self.undelivered),
                     extra={"worker_id": self.worker_id, "count": len(self.undelivered)})
            self.link.tell(Lost(generation=self.generation, source="control", reason=str(lost)))
        elif later and not self.retry_queued:
            self.retry_queued = True
            gevent.spawn_later(RETRY_AFTER_S, tell_quietly, self.actor_ref, _Again())
