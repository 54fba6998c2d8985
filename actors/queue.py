"""QueueActor: the one owner of every live task.

It receives the queue-bound requests of one `recv()` as one message, applies each change through the
state machine (`task_states`), writes the WAL records of the whole message with one `append`, and only
then tells the replies back (docs/protocol.md "Task states": durability). A CLAIM that finds nothing waits as a stored
reply address until a task arrives or its `wait_ms` runs out (`actors.waiters`). How answers are
worded and told back is in `actors.answers`.

It is essential (`actors.hub_actor`): an exception escaping a handler drops that message's unwritten
WAL records and its replies, answers its requests and every waiting CLAIM with an error instead, and
stops the broker (exit 70) without a snapshot of the half-changed memory; the next start replays the
WAL, which holds every acknowledged change. The records of earlier messages are already written.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent

from actors import queue_admin
from actors import task_states as states
from actors.answers import (
    PendingReplies,
    finished_answer,
    not_durable,
    queue_gauges,
    refuse,
    send_replies,
    stats_info,
    task_info,
    with_running,
    writable_error,  # also imported from here by actors.system
)
from actors.browse import BrowsableIndex
from actors.crash_replies import crash_replies, refusals_after_crash
from actors.dispatch import handles
from actors.envelopes import (
    ConnectionClosed,
    CopySlice,
    ExpireLeases,
    FillStats,
    FillWorkers,
    ForgetClaimer,
    HistoryWritten,
    PrepareSnapshot,
    QueueRequests,
    ReclaimWorker,
    RenewLeases,
    Shutdown,
    SnapshotData,
    SnapshotSlice,
    SnapshotTaken,
    Tick,
    WorkerSeen,
)
from actors.history_link import HistoryLink
from actors.hub_actor import ActorCrashed, HubActor, injected_crash
from actors.metrics import BrokerMetrics
from actors.queue_ops import QueueOps
from actors.recent import RecentTasks
from actors.snapshot_image import SnapshotImage
from actors.waiters import ClaimWaiters
from config.settings import Settings
from storage.history_ids import ID_CLOCK_SLACK_S, id_time
from storage.model import (
    Counters,
    LeasesRenewed,
    OpsState,
    TaskDied,
    TaskRecord,
    TaskState,
    TaskSubmitted,
    WalRecord,
    apply_record,
)
from storage.wal_format import WalError
from transport.messages import (
    Assigned,
    Assignment,
    Cancel,
    Claim,
    Error,
    ErrorCode,
    Message,
    Ok,
    Result,
    StatsReply,
    Status,
    Submit,
    SubmitBatch,
    Submitted,
    SubmittedBatch,
    TaskStatus,
    WorkerList,
)
from transport.messages_ops import READ_REQUESTS

log = logging.getLogger("tqbroker.queue")

# Answered even while changes are refused (shutting down, disk full).
_READS: tuple[type[Message], ...] = (Status, *READ_REQUESTS)
MAX_WAIT_MS = 60_000
WAL_HEADROOM_BYTES = 64 * 1024  # writes are refused when the WAL's disk has less than this free
TICK_INTERVAL_S = 0.01  # scheduled tasks become claimable, expired leases pending, within this of their time
RECORD_OVERHEAD_BYTES = 512  # WAL bytes of one record besides the payload, result and error it carries


class _Stopped(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QueueActor(HubActor):
    crash_policy = "essential"
    expected_errors = (WalError,)  # PrepareSnapshot: the WAL cannot rotate (disk full); nothing changed
    def __init__(
        self, settings: Settings, wal: Any = None, history: HistoryLink | None = None,
        recovered: tuple[dict[str, TaskRecord], Counters] | None = None, registry: Any = None,
        metrics: BrokerMetrics | None = None, ops_state: OpsState | None = None,
    ) -> None:
        super().__init__()
        b = settings.broker
        self.settings = settings
        self.max_batch_claim = b.max_batch_claim
        self.depth_threshold = b.queue_depth_threshold
        self.max_pending_bytes = b.max_pending_bytes
        self.payload_bytes = 0  # sum of len(payload) over live tasks (pending, scheduled, running)
        self.default_max_retries = b.default_max_retries
        self.default_lease_ms = int(b.worker_lease_timeout_secs * 1000)
        self.backoff = (b.retry_backoff_base_ms, b.retry_backoff_max_ms)
        self.wal = wal
        self.history = history or HistoryLink(None)
        self.registry = registry
        self.metrics = metrics or BrokerMetrics()
        self.gauge_interval_s = b.maintenance_interval_secs
        self._gauges_at = 0.0
        self.index = BrowsableIndex()  # a TaskIndex that can also page through live tasks (BROWSE)
        self.counters = Counters()
        self.ids = states.TaskIds()
        self.ready_seq = 0
        self.started = time.time()
        self.known_workers: set[str] = set()
        self.first_claimed_on: dict[str, set[str]] = {}  # connection urn → worker ids first seen on it
        p = settings.persistence
        self.recent = RecentTasks(p.recent_results_bytes)
        self.ops = QueueOps(p.dead_set_max, p.dead_set_retention_days * 86400, ops_state, time.time())
        self.waiters = ClaimWaiters(self._claimable, self._claim, self._queue_reply)
        self.shutting_down = False
        self.writes_stopped: str | None = None  # why: a WAL append failed with changes that cannot be undone
        self._records: list[WalRecord] = []
        self._pending_replies: PendingReplies = {}
        self._submitted: dict[str, int] = {}  # per queue, counted into the metric once per tick
        self.image = SnapshotImage()  # the snapshot being copied (actors.snapshot_image)
        if recovered is not None:
            self._load(*recovered)

    def on_start(self) -> None:
        self.history.notify = self.actor_ref.tell
        self.every(TICK_INTERVAL_S, Tick())

    def _load(self, tasks: dict[str, TaskRecord], counters: Counters) -> None:
        """Rebuilds the indexes from recovered tasks; pending order is kept by ready_seq."""
        self.counters = counters
        for n, task in enumerate(sorted(tasks.values(), key=lambda t: t.ready_seq)):
            if n % 10_000 == 0:
                gevent.sleep(0)  # keep /healthz answering while a large queue is rebuilt
            self.index.tasks[task.task_id] = task
            if task.state == TaskState.FAILED:  # in the dead set: not claimable, no unique key
                continue
            self.payload_bytes += len(task.payload)
            self.index.enter(task)
            self.index.add_unique(task)
            self.ready_seq = max(self.ready_seq, task.ready_seq)
            if task.worker_id:
                self.known_workers.add(task.worker_id)
        dead = sorted((t for t in tasks.values() if t.state == TaskState.FAILED), key=lambda t: t.finished_at or 0)
        for task in dead:
            self.ops.add_dead(task.task_id)
        for worker_id in self.known_workers:  # their heartbeat clock starts now, so silent ones die
            if self.registry is not None:
                self.registry.tell(WorkerSeen(worker_id=worker_id, recovered=True))

    # ------------------------------------------------------------ dispatch

    def on_receive(self, message: Any) -> Any:
        """Dispatches `message` (actors.dispatch, inlined: the hot path), then writes its WAL records and
        releases its replies."""
        handler = self.handlers.get(type(message))
        result = None
        if handler is not None:
            result = handler(self, message)
        else:
            self.unexpected(message)
        self._commit()
        return result

    @handles(QueueRequests)
    def _on_requests(self, batch: QueueRequests) -> None:
        now = time.time()
        refusal = self._refusal(self._wal_estimate(batch.requests))
        for request in batch.requests:
            if refusal is not None and not isinstance(request, _READS):
                self._queue_reply(batch.reply_to, Error(id=request.id, code=refusal[0], message=refusal[1]))
                continue
            reply = self._request_handlers[type(request)](self, request, batch.reply_to, now)
            if reply is not None:
                self._queue_reply(batch.reply_to, reply)

    def _refusal(self, wal_bytes: int) -> tuple[str, str] | None:
        """Why changes are refused right now (shutting down, writes stopped, or the WAL cannot take
        `wal_bytes` more); reads go on.

        The free-space check comes before any change is applied, against the bytes the change's WAL
        records can take: a change refused for a full disk is never applied in memory. (A disk filled by
        someone else between the check and the write can still fail the append: see `_commit`.)
        """
        if self.shutting_down:
            return ErrorCode.SHUTTING_DOWN, "broker is shutting down; retry against its replacement"
        if self.writes_stopped is not None:
            return ErrorCode.INTERNAL, self.writes_stopped
        if self.wal is None:
            return None
        if not (self.wal.healthy or self.wal.probe()):
            return ErrorCode.INTERNAL, writable_error(self.wal)
        free = self.wal.free_bytes()
        if free < 2 * wal_bytes + WAL_HEADROOM_BYTES:
            return ErrorCode.INTERNAL, (f"disk full: {self.wal.directory} has {free} bytes free; "
                                        "free space on that disk and retry")
        return None

    def _wal_estimate(self, requests: list[Message]) -> int:
        """An upper bound of the WAL bytes `requests` can add: a SUBMIT's record holds the whole task, a
        RESULT's the result and error, a CLAIM writes one record per task it may take."""
        total = 0
        for r in requests:
            if isinstance(r, Submit):
                total += len(r.task.payload) + RECORD_OVERHEAD_BYTES
            elif isinstance(r, SubmitBatch):
                total += sum(len(spec.payload) + RECORD_OVERHEAD_BYTES for spec in r.tasks)
            elif isinstance(r, Result):
                total += len(r.result or b"") + 4 * len(r.error or "") + RECORD_OVERHEAD_BYTES
            elif isinstance(r, Claim):
                total += RECORD_OVERHEAD_BYTES * min(max(r.max_tasks, 1), self.max_batch_claim)
            else:
                total += RECORD_OVERHEAD_BYTES
        return total

    # ------------------------------------------------------------ submit

    def _admit(self, request_id: int, payload_bytes: int) -> Error | None:
        """QUEUE_FULL when the queue is at its depth threshold, or when `payload_bytes` more would take
        the live payloads past broker.max_pending_bytes; a batch is admitted whole or not at all."""
        message = None
        if self.index.pending_total + self.index.scheduled_total >= self.depth_threshold:
            message = f"queue depth reached broker.queue_depth_threshold ({self.depth_threshold}); retry later"
        elif self.payload_bytes + payload_bytes > self.max_pending_bytes:
            message = (f"payloads of live tasks would pass broker.max_pending_bytes ({self.max_pending_bytes}): "
                       f"{self.payload_bytes} held, {payload_bytes} more asked; retry once workers catch up")
        if message is None:
            return None
        self.metrics.backpressure.inc()
        return Error(id=request_id, code=ErrorCode.QUEUE_FULL, message=message)

    def _submit_one(self, spec: Any, now: float) -> tuple[str, bool]:
        injected_crash(spec.kind)
        if spec.unique_key is not None:
            existing = self.index.unique.get((spec.queue, spec.unique_key))
            if existing is not None:
                return existing, True
        self.ready_seq += 1
        record = states.new_task(spec, self.ids.next(), now, self.ready_seq, self.default_max_retries,
                                 self.default_lease_ms)
        apply_record(record, self.index.tasks, self.counters)
        self.payload_bytes += len(record.task.payload)
        self.index.enter(record.task)
        self.index.add_unique(record.task)
        self._records.append(record)
        self._submitted[spec.queue] = self._submitted.get(spec.queue, 0) + 1
        if record.task.state == TaskState.PENDING:
            self.waiters.serve(record.task.queue, now)
        return record.task.task_id, False

    def _on_submit(self, req: Submit, reply_to: Any, now: float) -> Message:
        spec = req.task
        if spec.unique_key is not None:  # a duplicate adds nothing, so even a full queue answers it
            existing = self.index.unique.get((spec.queue, spec.unique_key))
            if existing is not None:
                return Submitted(id=req.id, task_id=existing, duplicate=True)
        refusal = self._admit(req.id, len(spec.payload))
        if refusal is not None:
            return refusal
        task_id, duplicate = self._submit_one(req.task, now)
        return Submitted(id=req.id, task_id=task_id, duplicate=duplicate)

    def _on_submit_batch(self, req: SubmitBatch, reply_to: Any, now: float) -> Message:
        refusal = self._admit(req.id, sum(len(spec.payload) for spec in req.tasks))
        if refusal is not None:
            return refusal
        return SubmittedBatch(id=req.id, task_ids=[self._submit_one(spec, now)[0] for spec in req.tasks])

    # ------------------------------------------------------------ claim

    def _on_claim(self, req: Claim, reply_to: Any, now: float) -> Message | None:
        if req.worker_id not in self.known_workers:
            self.known_workers.add(req.worker_id)
            self.first_claimed_on.setdefault(reply_to.actor_urn, set()).add(req.worker_id)
            if self.registry is not None:
                self.registry.tell(WorkerSeen(worker_id=req.worker_id))
        max_tasks = min(max(req.max_tasks, 1), self.max_batch_claim)
        tasks = self._claim(req.worker_id, req.queues, max_tasks, now)
        wait_ms = min(max(req.wait_ms, 0), MAX_WAIT_MS)
        if tasks or wait_ms == 0:
            return Assigned(id=req.id, tasks=tasks)
        self.waiters.park(req, max_tasks, reply_to, now + wait_ms / 1000.0)
        return None

    def _claim(self, worker_id: str, queues: list[str], limit: int, now: float) -> list[Assignment]:
        assignments = []
        for task in self.ops.claim_order(self.index, queues, limit, now):
            self.metrics.claim_wait.observe(max(now - task.run_at, 0.0))
            self._change(task, states.claim(task, worker_id, now))
            assignments.append(Assignment(
                task_id=task.task_id, queue=task.queue, kind=task.kind, payload=task.payload,
                priority=task.priority, attempt=task.attempts, lease_expires_at=task.lease_expires_at or now,
                max_retries=task.max_retries,
            ))
        return assignments

    # ------------------------------------------------------------ result, status, cancel

    def _on_result(self, req: Result, reply_to: Any, now: float) -> Message | None:
        task = self.index.tasks.get(req.task_id)
        if task is None:
            self._answer_unknown(req.id, req.task_id, reply_to, ErrorCode.NOT_LEASED,
                                 f"task {req.task_id} is finished; worker {req.worker_id} holds no lease on it")
            return None
        if not states.holds_lease(task, req.worker_id):
            return Error(id=req.id, code=ErrorCode.NOT_LEASED,
                         message=f"worker {req.worker_id} does not hold task {req.task_id} (state {task.state}, "
                                 f"held by {task.worker_id or 'nobody'})")
        self.metrics.observe_processing(task.queue, now - (task.started_at or now))
        if req.ok:
            self._change(task, states.complete(task, req.result, now))
        else:
            base_ms, max_ms = self.backoff
            self._change(task, states.fail(task, req.error, req.retry is not False, now, base_ms, max_ms))
        return Ok(id=req.id)

    def _on_status(self, req: Status, reply_to: Any, now: float) -> Message | None:
        task = self.index.tasks.get(req.task_id) or self.recent.get(req.task_id)
        if task is not None:
            return TaskStatus(id=req.id, task=task_info(task))
        self._answer_unknown(req.id, req.task_id, reply_to, None, "")
        return None

    def _on_cancel(self, req: Cancel, reply_to: Any, now: float) -> Message | None:
        task = self.index.tasks.get(req.task_id)
        if task is None:
            self._answer_unknown(req.id, req.task_id, reply_to, ErrorCode.INVALID_STATE,
                                 f"task {req.task_id} is already finished; only pending or scheduled tasks "
                                 "can be cancelled")
            return None
        if not states.can_cancel(task):
            return Error(id=req.id, code=ErrorCode.INVALID_STATE,
                         message=f"task {req.task_id} is {task.state}; only pending or scheduled tasks "
                                 "can be cancelled")
        self._change(task, states.cancel(task, now))
        return Ok(id=req.id)

    def _answer_unknown(self, request_id: int, task_id: str, reply_to: Any, code: str | None, message: str) -> None:
        """A task not in memory: finished long ago (history answers), never known (NOT_FOUND), or
        unknowable right now (history could not be read: UNAVAILABLE, never NOT_FOUND).

        `code` is the error for a finished task; None means answer with its status.
        """
        finished = self.recent.get(task_id)
        if finished is not None:
            self._queue_reply(reply_to, finished_answer(request_id, finished, code, message))
            return
        if not self._may_exist(task_id):
            self._queue_reply(reply_to, Error(id=request_id, code=ErrorCode.NOT_FOUND,
                                              message=f"no task with id {task_id}"))
            return

        def answer(task: TaskRecord | None, failure: str | None) -> Message:
            if failure is not None:
                return Error(id=request_id, code=ErrorCode.UNAVAILABLE,
                             message=f"task {task_id} is not live and task history cannot be read right now "
                                     f"({failure}); retry in a few seconds")
            if task is None:
                return Error(id=request_id, code=ErrorCode.NOT_FOUND, message=f"no task with id {task_id}")
            return finished_answer(request_id, task, code, message)

        self.history.lookup(task_id, lambda task, failure: send_replies({"": (reply_to, [answer(task, failure)])}))

    def _may_exist(self, task_id: str) -> bool:
        """False only for an id no task of this broker can have: not of its format (states.TaskIds), its
        time later than now (less a stepped-back clock's slack), or of this run but not issued yet."""
        issued_at = id_time(task_id)
        if issued_at is None or issued_at > time.time() + ID_CLOCK_SLACK_S:
            return False
        return self.ids.could_have_issued(task_id)

    # ------------------------------------------------------------ leases and workers

    @handles(RenewLeases)
    def _on_renew(self, msg: RenewLeases) -> None:
        now = time.time()
        renewed_ids, expiries = [], []
        for task_id in msg.active:
            task = self.index.tasks.get(task_id)
            if task is not None and states.holds_lease(task, msg.worker_id):
                task.lease_expires_at = now + task.lease_ms / 1000.0
                self.index.push_lease(task)
                renewed_ids.append(task_id)
                expiries.append(task.lease_expires_at)
        if renewed_ids:
            self._records.append(LeasesRenewed(task_ids=renewed_ids, lease_expires_at=expiries))
        self._queue_reply(msg.reply_to, Ok(id=msg.request_id))

    @handles(ExpireLeases)
    def _on_expire_leases(self, _msg: ExpireLeases) -> None:
        self._expire_leases(time.time())

    def _expire_leases(self, now: float) -> None:
        """Runs whose lease ran out before `now` go back to pending (the run counted)."""
        for task in self.index.expired_leases(now):
            log.info("lease expired", extra={"task_id": task.task_id, "worker_id": task.worker_id})
            self.metrics.leases_expired.inc()
            self._lose_run(task, "lease expired", now)

    def _lose_run(self, task: TaskRecord, reason: str, now: float) -> None:
        self.ready_seq += 1
        self._change(task, states.run_lost(task, reason, now, self.ready_seq))

    @handles(ReclaimWorker)
    def _on_reclaim(self, msg: ReclaimWorker) -> None:
        now = time.time()
        held = sorted((self.index.tasks[t] for t in self.index.by_worker.get(msg.worker_id, ())),
                      key=lambda t: t.ready_seq)
        for task in held:
            if msg.uncount:
                self.ready_seq += 1
                self._change(task, states.returned(task, self.ready_seq))
            else:
                self._lose_run(task, f"worker {msg.worker_id} stopped heartbeating", now)
        self.known_workers.discard(msg.worker_id)
        if msg.reply_to is not None:
            self._queue_reply(msg.reply_to, Ok(id=msg.request_id))

    # ------------------------------------------------------------ timers, stats, shutdown

    @handles(Tick)
    def _on_tick(self, _msg: Tick) -> None:
        now = time.time()
        self._publish_submitted()
        for task in self.index.due_scheduled(now):
            self.ready_seq += 1
            self._change(task, states.promote(task, self.ready_seq))
        self._expire_leases(now)
        self.waiters.expire(now)
        self.history.flush_due(now)
        maintenance = now - self._gauges_at >= self.gauge_interval_s
        queue_admin.on_tick(self, now, maintenance)
        if maintenance:
            self._gauges_at = now
            self._refresh_gauges()

    def _publish_submitted(self) -> None:
        """Adds the SUBMITs accepted since the last tick to `tq_tasks_submitted_total`.

        Once per tick, not per message (a prometheus-client `inc` takes a lock; see
        docs/performance.md#the-submitted-tasks-metric), so the metric lags the replies by up to one tick
        (TICK_INTERVAL_S)."""
        if self._submitted:
            for queue, count in self._submitted.items():
                self.metrics.count_submitted(queue, count)
            self._submitted.clear()

    def _refresh_gauges(self) -> None:
        idx = self.index
        tiers, per_queue = queue_gauges(idx)
        self.metrics.set_queue_gauges(idx.pending_total, idx.running_total, idx.scheduled_total, tiers,
                                      per_queue, self.history.backlog)
        self.metrics.pending_payload_bytes.set(self.payload_bytes)

    @handles(FillStats)
    def _on_fill_stats(self, msg: FillStats) -> None:
        paused = sorted(q for q, setting in self.ops.settings.items() if setting.paused)
        stats = stats_info(self.index, self.counters, msg.workers_alive, msg.connections, time.time() - self.started,
                           paused)
        self._queue_reply(msg.reply_to, StatsReply(id=msg.request_id, stats=stats))

    @handles(FillWorkers)
    def _on_fill_workers(self, msg: FillWorkers) -> None:
        workers = with_running(msg.workers, self.index.by_worker)
        self._queue_reply(msg.reply_to, WorkerList(id=msg.request_id, workers=workers))

    @handles(PrepareSnapshot)
    def _on_prepare_snapshot(self, _msg: PrepareSnapshot) -> SnapshotData:
        """Rotates the WAL and starts an image of the tasks live at that point, fetched with CopySlice
        (the contract that makes the fuzzy copies exact after replay: actors.snapshot_image)."""
        segment = self.wal.rotate() if self.wal is not None else 0
        if self.wal is not None and (self.ops.settings or self.ops.state.schedules):
            self.wal.append(self.ops.image())  # the new segment restores queue settings (see QueueOps.image)
        counters, count = self.image.start(self.index.tasks, self.counters)
        batch_id, finished = self.history.take_unflushed()
        return SnapshotData(counters=counters, wal_segment=segment, finished_batch=batch_id, finished=finished,
                            task_count=count)

    @handles(CopySlice)
    def _on_copy_slice(self, msg: CopySlice) -> SnapshotSlice:
        """The next slice of the image; none once writes stopped (memory may hold changes the WAL lacks)."""
        return SnapshotSlice(tasks=[] if self.writes_stopped else self.image.copy_slice(msg.start))

    @handles(SnapshotTaken)
    def _on_snapshot_taken(self, msg: SnapshotTaken) -> None:
        self.image.clear()
        if msg.finished_batch:
            self.history.written(HistoryWritten(batch_id=msg.finished_batch, error=msg.error))
        if msg.error is None and self.wal is not None:
            self.wal.delete_segments_before(msg.wal_segment)

    @handles(ConnectionClosed)
    def _on_connection_closed(self, msg: ConnectionClosed) -> None:
        """Withdraws the connection's waiting claims; worker ids first seen on it that hold no task go to
        the registry to be forgotten (it keeps those that registered or heartbeated)."""
        urn = msg.reply_to.actor_urn
        self.waiters.withdraw(urn)
        for worker_id in self.first_claimed_on.pop(urn, ()):
            if worker_id in self.known_workers and not self.index.by_worker.get(worker_id):
                self.known_workers.discard(worker_id)
                if self.registry is not None:
                    self.registry.tell(ForgetClaimer(worker_id=worker_id))

    @handles(HistoryWritten)
    def _on_history_written(self, msg: HistoryWritten) -> None:
        self.history.written(msg)

    @handles(Shutdown)
    def _on_shutdown(self, _msg: Shutdown) -> None:
        self.shutting_down = True
        self._publish_submitted()
        self.waiters.expire(time.time(), everyone=True)
        self.history.flush_due(float("inf"))

    # ------------------------------------------------------------ applying changes, replying

    def _change(self, task: TaskRecord, record: WalRecord) -> None:
        """Applies one state-machine record to the task and the indexes, and queues it for the WAL."""
        self.index.leave(task)
        record = self.ops.keep_dead(record)  # failed for good: TaskDied keeps it in the dead set
        finished = apply_record(record, self.index.tasks, self.counters)
        self._records.append(record)  # before any claim it triggers: replay must see the same order
        if getattr(record, "retried", False):
            self.metrics.retried.inc()
        if finished is not None:
            self._finished(finished)
            if isinstance(record, TaskDied):
                queue_admin.task_died(self, task.task_id, finished.finished_at or 0.0)
            return
        self.index.enter(task)
        if task.state == TaskState.PENDING:
            self.waiters.serve(task.queue, time.time())

    def _finished(self, task: TaskRecord) -> None:
        self.index.forget(task)
        self.payload_bytes -= len(task.payload)
        self.metrics.count_finished(task.queue, task.state)
        self.recent.add(task)
        self.history.add(task)

    def _claimable(self, queues: Any) -> bool:
        """Whether a claim on `queues` would get a task now (pending, not paused, within its rate limit)."""
        now = time.time()
        return any(self.ops.claimable(self.index, q, now) for q in queues)

    def _queue_reply(self, reply_to: Any, message: Message) -> None:
        """Holds `message` for `reply_to` until `_commit`: it leaves once this message's WAL records are
        durable, in the order queued."""
        key = reply_to.actor_urn
        entry = self._pending_replies.get(key)
        if entry is None:
            self._pending_replies[key] = (reply_to, [message])
        else:
            entry[1].append(message)

    def _commit(self) -> None:
        """Writes this message's WAL records, then releases its replies once they are durable."""
        replies, self._pending_replies = self._pending_replies, {}
        records, self._records = self._records, []
        if records and self.wal is not None and self.writes_stopped is not None:
            records = []  # memory may hold changes the WAL lacks: write nothing more until the restart
            replies = {k: (ref, [refuse(m, _Stopped(self.writes_stopped)) for m in msgs])
                      for k, (ref, msgs) in replies.items()}
        if records and self.wal is not None:
            try:
                self.wal.append(records)
            except Exception as exc:  # WalError: refuse the acknowledgements, keep answering reads
                log.error("WAL append failed: %s", getattr(exc, "message", exc))
                self._undo_or_stop(records)
                replies = {k: (ref, [refuse(m, exc) for m in msgs]) for k, (ref, msgs) in replies.items()}
                send_replies(replies)
                return
            self.wal.after_durable(lambda: send_replies(replies), lambda exc: send_replies(not_durable(replies, exc)))
            return
        send_replies(replies)

    # ------------------------------------------------------------ after a crash (see the module docstring)

    def on_crash(self, message: Any) -> None:
        """Never sends the crashing message's replies nor writes its records (`actors.crash_replies`)."""
        self._records.clear()
        unsent, self._pending_replies = self._pending_replies, {}
        send_replies(crash_replies(message, unsent, self.waiters, self.crashed or ""))

    def after_crash(self, message: Any) -> Any:
        """Requests get SHUTTING_DOWN, timers and notices nothing, asks (a snapshot) ActorCrashed."""
        refusals = refusals_after_crash(message)
        if refusals is not None:
            send_replies(refusals)
        elif isinstance(message, PrepareSnapshot | CopySlice):
            raise ActorCrashed(f"no snapshot of a crashed queue actor: {self.crashed}")
        elif not isinstance(message, _IGNORED_AFTER_CRASH):
            return super().after_crash(message)
        return None

    def _undo_or_stop(self, records: list[WalRecord]) -> None:
        """After a failed append, memory must not keep what the WAL lacks. New tasks alone (the usual
        SUBMIT) are taken back out; any other change stops all writes until a restart, which recovers
        exactly the acknowledged state from the WAL."""
        submitted = [r for r in records if isinstance(r, TaskSubmitted)]
        if len(submitted) == len(records):
            for record in reversed(submitted):
                task = self.index.tasks.pop(record.task.task_id)
                self.index.leave(task)
                task.state = TaskState.CANCELLED  # its heap entries are stale from now on
                self.index.forget(task)
                self.counters.submitted_total -= 1
                self.payload_bytes -= len(task.payload)
                self._submitted[task.queue] = self._submitted.get(task.queue, 1) - 1
            return
        self.writes_stopped = ("a write-ahead log append failed after its changes were applied in memory; "
                               "writes are refused until the broker restarts: restart it (free disk space "
                               "first if the disk is full); nothing acknowledged is lost")
        log.error("%s", self.writes_stopped)

    _request_handlers: dict[type, Any] = {
        Submit: _on_submit, SubmitBatch: _on_submit_batch, Claim: _on_claim, Result: _on_result,
        Status: _on_status, Cancel: _on_cancel, **queue_admin.HANDLERS,
    }


_IGNORED_AFTER_CRASH = (Tick, ExpireLeases, HistoryWritten, SnapshotTaken, ConnectionClosed, Shutdown)
