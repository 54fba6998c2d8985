"""WorkerRegistryActor: the one owner of what the broker knows about workers.

Registration (explicit, or automatic on a worker id's first HEARTBEAT or CLAIM), metadata, heartbeats
with CPU and memory, and dead-worker detection: a worker silent for 2 × `worker.heartbeat_interval_secs`
is declared dead within DEADLINE_TICK_S of that deadline (a heap of deadlines, looked at on a short
timer; a heartbeat pushes a new entry and the old one goes stale) and the queue actor reclaims its
running tasks. A sweep of every worker on `check_interval_s` forgets long-dead ones. Requests that also need task state
(HEARTBEAT's lease renewals, STATS, WORKERS, DEREGISTER) are passed on to the queue actor with the
connection's reply address (`actors.outbox.ConnectionOutbox`), so the answer still takes no blocking
`ask`.

It is essential (`actors.hub_actor`): a crash stops the broker (exit 70); until then the crashing
request is answered INTERNAL and every later one SHUTTING_DOWN.
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from typing import Any

from actors.crash_replies import STOPPING
from actors.dispatch import handles
from actors.envelopes import (
    CheckWorkers,
    DeadlineTick,
    FillStats,
    FillWorkers,
    ForgetClaimer,
    ReclaimWorker,
    RegistryRequest,
    RenewLeases,
    Replies,
    UseQueue,
    WorkerSeen,
)
from actors.hub_actor import HubActor, injected_crash
from actors.metrics import BrokerMetrics
from transport.messages import (
    Deregister,
    Error,
    ErrorCode,
    Heartbeat,
    Message,
    Register,
    Registered,
    Stats,
    WorkerInfo,
    Workers,
)

log = logging.getLogger("tqbroker.registry")

DEAD_WORKER_RETENTION_S = 3600.0
RECOVERY_GRACE_S = 5.0  # after a restart, workers of recovered tasks get up to this long extra to reconnect
DEADLINE_TICK_S = 0.02  # a silent worker is declared dead within this of its 2 × heartbeat deadline


class WorkerRecord:
    """What the registry knows of one worker."""

    __slots__ = ("worker_id", "name", "hostname", "pid", "queues", "concurrency", "metadata", "alive",
                 "last_heartbeat", "cpu_percent", "memory_bytes", "grace_until", "claim_only")

    def __init__(self, worker_id: str, now: float) -> None:
        self.worker_id = worker_id
        self.name = worker_id
        self.hostname = ""
        self.pid = 0
        self.queues: list[str] = []
        self.concurrency = 0
        self.metadata: dict[str, str] = {}
        self.alive = True
        self.last_heartbeat = now
        self.cpu_percent = 0.0
        self.memory_bytes = 0
        self.grace_until = 0.0  # not declared dead before this (reconnect time after a broker restart)
        self.claim_only = False  # known only from CLAIMs: never REGISTERed nor HEARTBEATed

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, name=self.name, hostname=self.hostname, pid=self.pid, queues=self.queues,
            concurrency=self.concurrency, metadata=self.metadata, alive=self.alive,
            last_heartbeat=self.last_heartbeat, cpu_percent=self.cpu_percent, memory_bytes=self.memory_bytes,
            running=[],
        )


class WorkerRegistryActor(HubActor):
    crash_policy = "essential"

    def __init__(self, heartbeat_interval_s: float, check_interval_s: float, metrics: BrokerMetrics | None = None
                 ) -> None:
        super().__init__()
        self.metrics = metrics or BrokerMetrics()
        self.dead_after_s = 2 * heartbeat_interval_s
        self.check_interval_s = check_interval_s
        self.workers: dict[str, WorkerRecord] = {}
        self.queue: Any = None
        self._deadlines: list[tuple[float, str]] = []  # (when silence makes it dead, worker id); lazy deletion

    def on_start(self) -> None:
        self.every(self.check_interval_s, CheckWorkers())
        self.every(DEADLINE_TICK_S, DeadlineTick())

    @handles(WorkerSeen)
    def _on_worker_seen(self, message: WorkerSeen) -> None:
        self._seen(message.worker_id, time.time(), message.recovered)

    @handles(ForgetClaimer)
    def _on_forget_claimer(self, message: ForgetClaimer) -> None:
        self._forget_claimer(message.worker_id)

    @handles(DeadlineTick)
    def _on_deadline_tick(self, _message: DeadlineTick) -> None:
        self._check_due(time.time())

    @handles(CheckWorkers)
    def _on_check_workers(self, _message: CheckWorkers) -> None:
        self._check(time.time())

    @handles(UseQueue)
    def _on_use_queue(self, message: UseQueue) -> None:
        self.queue = message.queue

    def on_crash(self, message: Any) -> None:
        if isinstance(message, RegistryRequest):
            _tell(message.reply_to, Error(id=message.request.id, code=ErrorCode.INTERNAL,
                                          message=f"internal error, the request was not applied ({self.crashed}); "
                                                  "retry once the broker has restarted"))

    def after_crash(self, message: Any) -> None:
        if isinstance(message, RegistryRequest):
            _tell(message.reply_to, Error(id=message.request.id, code=ErrorCode.SHUTTING_DOWN,
                                          message=STOPPING))
        elif not isinstance(message, (WorkerSeen, CheckWorkers, DeadlineTick, UseQueue, ForgetClaimer)):
            super().after_crash(message)

    @property
    def alive_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.alive)

    def _known(self, worker_id: str, now: float) -> WorkerRecord:
        """The worker's record, registering it on first sight (auto-registration)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerRecord(worker_id, now)
            log.info("worker registered", extra={"worker_id": worker_id})
            self._arm(worker)
        return worker

    def _deadline(self, worker: WorkerRecord) -> float:
        """When `worker` is dead if it stays silent: 2 × heartbeat after the last one, not in its grace."""
        return max(worker.last_heartbeat + self.dead_after_s, worker.grace_until)

    def _arm(self, worker: WorkerRecord) -> None:
        """Indexes the worker's current deadline; call after last_heartbeat or grace_until changed.

        The heap holds at most about (2 × heartbeat / heartbeat interval) + 1 entries per worker, since
        each entry leaves it when its time comes; a stale one (the worker heartbeated since) is skipped.
        """
        heapq.heappush(self._deadlines, (self._deadline(worker), worker.worker_id))

    def _check_due(self, now: float) -> None:
        """Declares dead every alive worker whose current deadline has passed; O(1) when none has."""
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, worker_id = heapq.heappop(heap)
            worker = self.workers.get(worker_id)
            if worker is not None and worker.alive and self._deadline(worker) < now:
                self._declare_dead(worker, now)

    def _seen(self, worker_id: str, now: float, recovered: bool = False) -> None:
        """A CLAIM from a worker the queue had not seen (new, or reclaimed as dead): it is alive now.

        A revived worker gets a fresh 2 × heartbeat window; if it stays silent it is declared dead
        again and whatever it claimed meanwhile is reclaimed.
        """
        new = worker_id not in self.workers
        worker = self._known(worker_id, now)
        worker.claim_only = worker.claim_only or (new and not recovered)
        if recovered:
            worker.grace_until = now + min(RECOVERY_GRACE_S, self.dead_after_s)
            self._arm(worker)
        if not worker.alive:
            worker.alive, worker.last_heartbeat = True, now
            log.info("worker is claiming again after being declared dead", extra={"worker_id": worker_id})
            self._arm(worker)

    def _forget_claimer(self, worker_id: str) -> None:
        """Drops a claim-only worker whose connection closed holding nothing: it is not a live worker."""
        worker = self.workers.get(worker_id)
        if worker is not None and worker.claim_only:
            del self.workers[worker_id]
            log.info("worker forgotten: it only claimed, and its connection closed", extra={"worker_id": worker_id})

    @handles(RegistryRequest)
    def _on_request(self, msg: RegistryRequest) -> None:
        req, reply_to, now = msg.request, msg.reply_to, time.time()
        if isinstance(req, Heartbeat):
            worker = self._known(req.worker_id, now)
            if not worker.alive:
                log.info("worker is alive again", extra={"worker_id": req.worker_id})
            worker.alive, worker.last_heartbeat, worker.claim_only = True, now, False
            self._arm(worker)
            if req.cpu_percent is not None:
                worker.cpu_percent = req.cpu_percent
            if req.memory_bytes is not None:
                worker.memory_bytes = req.memory_bytes
            self.queue.tell(RenewLeases(request_id=req.id, worker_id=req.worker_id, active=req.active,
                                        reply_to=reply_to))
        elif isinstance(req, Register):
            self._register(req, reply_to, now)
        elif isinstance(req, Deregister):
            if self.workers.pop(req.worker_id, None) is None:
                _tell(reply_to, Error(id=req.id, code=ErrorCode.NOT_FOUND,
                                      message=f"no worker with id {req.worker_id}"))
                return
            log.info("worker deregistered", extra={"worker_id": req.worker_id})
            self.queue.tell(ReclaimWorker(worker_id=req.worker_id, uncount=True, request_id=req.id,
                                          reply_to=reply_to))
        elif isinstance(req, Stats):
            self.queue.tell(FillStats(request_id=req.id, workers_alive=self.alive_count,
                                      connections=msg.connections, reply_to=reply_to))
        elif isinstance(req, Workers):
            infos = [w.info() for w in self.workers.values()]
            self.queue.tell(FillWorkers(request_id=req.id, workers=infos, reply_to=reply_to))

    def _register(self, req: Register, reply_to: Any, now: float) -> None:
        injected_crash(req.name or "")
        worker_id = req.worker_id or f"w-{uuid.uuid4().hex[:16]}"
        worker = self._known(worker_id, now)
        worker.alive, worker.last_heartbeat, worker.claim_only = True, now, False
        self._arm(worker)
        if req.name is not None:
            worker.name = req.name
        if req.hostname is not None:
            worker.hostname = req.hostname
        if req.pid is not None:
            worker.pid = req.pid
        if req.queues is not None:
            worker.queues = list(req.queues)
        if req.concurrency is not None:
            worker.concurrency = req.concurrency
        if req.metadata is not None:
            worker.metadata = dict(req.metadata)
        _tell(reply_to, Registered(id=req.id, worker_id=worker_id))

    def _check(self, now: float) -> None:
        """The safety sweep: declares dead the workers silent for too long, and forgets long-dead ones."""
        for worker in list(self.workers.values()):
            if worker.alive and self._deadline(worker) < now:
                self._declare_dead(worker, now)
            elif not worker.alive and now - worker.last_heartbeat > DEAD_WORKER_RETENTION_S:
                del self.workers[worker.worker_id]
        self.metrics.workers_connected.set(self.alive_count)

    def _declare_dead(self, worker: WorkerRecord, now: float) -> None:
        worker.alive = False
        log.warning("worker declared dead after %.2f s without a heartbeat", now - worker.last_heartbeat,
                    extra={"worker_id": worker.worker_id})
        if self.queue is not None:
            self.queue.tell(ReclaimWorker(worker_id=worker.worker_id, uncount=False))
        self.metrics.workers_dead.inc()


def _tell(reply_to: Any, message: Message) -> None:
    reply_to.tell(Replies([message]))
