"""The crash harness's load: pipelined SUBMITs, CLAIMs and RESULTs from two client threads until a kill.

A `LoadRound` runs a producer and a worker thread against the broker, each keeping many requests in
flight, and records what the broker acknowledged in the `Ledger`; the harness kills the broker at a
random moment of it. Why pipelined: a kill then lands with many requests half-way (sent, applied,
not yet acknowledged), which is where lost acknowledged changes would show.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from loadtest.crash_ledger import LEASE_MS, WORKER_ID, Ledger, error_for, matches, payload_for, result_for
from transport import messages as m
from transport.client import Client, PendingReply
from transport.errors import BrokerError, ClientError, NotLeased, RequestTimeout

QUEUE = "crash"
WINDOW = 100  # SUBMITs in flight at once
RESULT_WINDOW = 300  # RESULTs in flight at once
BACKLOG_CAP = 20_000  # the producer waits while this many acknowledged tasks are unfinished
FAIL_EVERY = 29  # every 29th claimed task gets RESULT ok=false retry=false
SCHEDULE_EVERY = 97  # every 97th submit is scheduled an hour ahead
BATCH_EVERY = 50  # every 50th request is a SUBMIT_BATCH of BATCH_SIZE
BATCH_SIZE = 5
HOLD_EVERY = 5  # every 5th claimed task is "slow": its RESULT is sent HOLD_S later, so kills find tasks running
HOLD_S = 1.5
HEARTBEAT_EVERY_S = 0.5
_LOST = (ClientError, RequestTimeout)


class _Producer(threading.Thread):
    """Keeps WINDOW requests in flight until stopped or cut off: SUBMITs, every BATCH_EVERY-th a
    SUBMIT_BATCH, and a CANCEL for every other task it submitted scheduled."""

    def __init__(self, client: Client, ledger: Ledger, stop: threading.Event, tag: str, rate: float) -> None:
        super().__init__(name="crash-producer", daemon=True)
        self.client, self.ledger, self.stop, self.tag, self.rate = client, ledger, stop, tag, rate
        self.seq = 0
        self.tasks = 0
        self.scheduled = 0
        self.ended = ""
        self._inflight: deque[tuple[PendingReply, list[float | None] | str]] = deque()

    def _next(self) -> tuple[m.Message, list[float | None]]:
        self.seq += 1
        if self.seq % BATCH_EVERY == 0:
            specs = [self._spec() for _ in range(BATCH_SIZE)]
            return m.SubmitBatch(id=0, tasks=[s for s, _ in specs]), [r for _, r in specs]
        spec, run_at = self._spec()
        return m.Submit(id=0, task=spec), [run_at]

    def _spec(self) -> tuple[m.TaskSpec, float | None]:
        self.seq += 1
        self.tasks += 1
        kind = f"crash.{self.tag}.{self.seq}"
        run_at = time.time() + 3600 if self.seq % SCHEDULE_EVERY == 0 else None
        return m.TaskSpec(kind=kind, payload=payload_for(kind), queue=QUEUE, run_at=run_at, lease_ms=LEASE_MS), run_at

    def _settle(self, slot: PendingReply, meta: list[float | None] | str) -> None:
        if isinstance(meta, str):  # a CANCEL of task `meta`
            try:
                slot.get()
            except BrokerError as exc:
                self.ledger.anomaly(f"CANCEL of scheduled task {meta} answered {exc}")
                return
            self.ledger.add_cancelled(meta)
            return
        try:
            reply = slot.get()
        except BrokerError:
            self.ledger.refused += 1
            return
        ids = [reply.task_id] if isinstance(reply, m.Submitted) else reply.task_ids  # type: ignore[attr-defined]
        for task_id, run_at in zip(ids, meta, strict=True):
            self.ledger.add_submitted(task_id, run_at)
            if run_at is not None:
                self.scheduled += 1
                if self.scheduled % 2 == 0:
                    with self.ledger.lock:
                        self.ledger.cancel_sent.add(task_id)
                    self._inflight.append((self.client.send_async(m.Cancel(id=0, task_id=task_id)), task_id))

    def run(self) -> None:
        inflight = self._inflight
        started = time.monotonic()
        try:
            while not self.stop.is_set():
                ahead = self.rate and self.tasks > self.rate * (time.monotonic() - started)
                if ahead or self.ledger.backlog() > BACKLOG_CAP:
                    self.stop.wait(0.002)  # pacing: --rate, and letting the worker catch up
                    continue
                msg, run_ats = self._next()
                inflight.append((self.client.send_async(msg), run_ats))
                while len(inflight) >= WINDOW:
                    self._settle(*inflight.popleft())
            while inflight:
                self._settle(*inflight.popleft())
        except _LOST as exc:
            self.ended = str(exc)
            for slot, meta in list(inflight):  # replies that made it before the connection died
                if slot.done():
                    try:
                        self._settle(slot, meta)
                    except _LOST:
                        pass


class _Worker(threading.Thread):
    """CLAIMs, HEARTBEATs, and pipelines RESULTs for what it holds; first finishes tasks left from a
    previous round (they survived the restart as running, held by this worker)."""

    def __init__(self, client: Client, ledger: Ledger, stop: threading.Event, rate: float) -> None:
        super().__init__(name="crash-worker", daemon=True)
        self.client, self.ledger, self.stop, self.rate = client, ledger, stop, rate
        self.sent = 0
        self.ended = ""
        self._results: deque[tuple[PendingReply, str]] = deque()
        self._holding: deque[tuple[float, str, tuple[str, bytes | str]]] = deque()  # (due, task, outcome)
        self._next_heartbeat = 0.0

    def _send_result(self, task_id: str, outcome: tuple[str, bytes | str]) -> None:
        state, value = outcome
        if state == "completed":
            msg = m.Result(id=0, worker_id=WORKER_ID, task_id=task_id, ok=True, result=value)  # type: ignore[arg-type]
        else:
            msg = m.Result(id=0, worker_id=WORKER_ID, task_id=task_id, ok=False, error=value, retry=False)  # type: ignore[arg-type]
        with self.ledger.lock:
            self.ledger.unsure.add(task_id)
        self._results.append((self.client.send_async(msg), task_id))
        self.sent += 1

    def _settle(self, slot: PendingReply, task_id: str) -> None:
        try:
            slot.get()
        except NotLeased as exc:
            if task_id in self.ledger.results:
                return
            self._settle_not_leased(task_id, exc)
            return
        except BrokerError as exc:
            self.ledger.anomaly(f"RESULT for {task_id} answered {exc}")
            return
        self.ledger.add_result(task_id)

    def _settle_not_leased(self, task_id: str, exc: BrokerError) -> None:
        """A RESULT re-sent after a restart for a task whose first RESULT did land before the kill."""
        try:
            info = self.client.status(task_id)
        except BrokerError as status_exc:
            self.ledger.anomaly(f"RESULT for {task_id} answered {exc}; STATUS answered {status_exc}")
            return
        expected = self.ledger.claimed.get(task_id)
        if expected is not None and matches(info, expected):
            self.ledger.add_result(task_id)
        else:
            self.ledger.anomaly(f"RESULT for {task_id} answered {exc}; it is {info.state} (worker {info.worker_id})")

    def _drain(self, block_over: int) -> None:
        results = self._results
        while results and (results[0][0].done() or len(results) > block_over):
            self._settle(*results.popleft())

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_EVERY_S
        with self.ledger.lock:
            active = list(self.ledger.claimed)[:50_000]
        self.client.send_async(m.Heartbeat(id=0, worker_id=WORKER_ID, active=active))

    def run(self) -> None:
        try:
            with self.ledger.lock:
                leftovers = list(self.ledger.claimed.items())
            for task_id, outcome in leftovers:
                self._send_result(task_id, outcome)
                self._drain(RESULT_WINDOW)
            started = time.monotonic()
            while not self.stop.is_set():
                self._heartbeat()
                while self._holding and self._holding[0][0] <= time.monotonic():
                    _, task_id, outcome = self._holding.popleft()
                    self._send_result(task_id, outcome)
                if self.rate and self.sent > self.rate * (time.monotonic() - started):
                    self._drain(RESULT_WINDOW)
                    self.stop.wait(0.002)  # pacing: --result-rate
                    continue
                claim = self.client.send_async(m.Claim(id=0, worker_id=WORKER_ID, queues=[QUEUE], max_tasks=10,
                                                       wait_ms=100))
                self._drain(RESULT_WINDOW)
                assigned = claim.get()
                for task in assigned.tasks:  # type: ignore[attr-defined]
                    if task.payload != payload_for(task.kind):
                        self.ledger.anomaly(f"task {task.task_id} ({task.kind}) came with a damaged payload")
                    seq = int(task.kind.rsplit(".", 1)[1])
                    outcome: tuple[str, bytes | str] = (
                        ("failed", error_for(task.task_id)) if seq % FAIL_EVERY == 0
                        else ("completed", result_for(task.task_id))
                    )
                    self.ledger.add_claimed(task.task_id, outcome)
                    if seq % HOLD_EVERY == 0:
                        self._holding.append((time.monotonic() + HOLD_S, task.task_id, outcome))
                    else:
                        self._send_result(task.task_id, outcome)
            self._drain(0)
        except _LOST as exc:
            self.ended = str(exc)
            for slot, task_id in self._results:
                if slot.done():
                    try:
                        self._settle(slot, task_id)
                    except _LOST:
                        pass


class LoadRound:
    """One round of load against host:port; `kill` is called at a random moment while it flows."""

    def __init__(self, host: str, port: int, ledger: Ledger, tag: str, rate: float = 0, result_rate: float = 0) -> None:
        """`rate`: SUBMITs per second at most, `result_rate`: RESULTs per second at most (0: as fast as the
        pipeline goes)."""
        self.ledger = ledger
        self.stop = threading.Event()
        self.clients = [Client(host, port, timeout=30.0, client_name="crash-harness") for _ in range(2)]
        self.producer = _Producer(self.clients[0], ledger, self.stop, tag, rate)
        self.worker = _Worker(self.clients[1], ledger, self.stop, result_rate)

    def run(self, kill: Callable[[], None], after_s: float, first_ack_timeout_s: float = 30.0) -> None:
        """Starts the load, waits for acknowledgements to flow, lets it run `after_s`, calls `kill`, and
        waits for both threads to notice the broker is gone."""
        before = len(self.ledger.submitted)
        self.ledger.start_round()
        self.producer.start()
        self.worker.start()
        deadline = time.monotonic() + first_ack_timeout_s
        while len(self.ledger.submitted) == before:
            if time.monotonic() > deadline or not self.producer.is_alive():
                raise RuntimeError(f"no SUBMIT acknowledged within {first_ack_timeout_s} s ({self.producer.ended})")
            time.sleep(0.005)  # polling for the first acknowledgement
        time.sleep(after_s)  # the random moment of the kill: this wait is the point of the harness
        kill()
        self.stop.set()
        for thread in (self.producer, self.worker):
            thread.join(timeout=60)
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not notice the killed broker within 60 s")
        for client in self.clients:
            client.close()
