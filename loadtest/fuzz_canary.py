"""The fuzzer's canary: a well-behaved client whose every round must keep working while the fuzz runs.

Why it exists: "the broker did not crash" is not enough; correct clients must stay correctly served
(round trips, priority order, fail and cancel paths, STATS, and a task after an abandoned long-poll CLAIM
still reaching a live worker). Each round is one check, ok or failed with the reason, in the `Tally`.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid

from loadtest.fuzz_wire import REQ, Options, RawConn, Tally, frame, pack
from transport import messages as m
from transport.client import Client
from transport.errors import BrokerError, ClientError

SLOW_CANARY_S = 5.0
HEARTBEAT_EVERY_S = 5.0  # well under the broker's default 15 s heartbeat interval


class Canary:
    """A correct client on its own queue; every round is one check, ok or failed with the reason."""

    def __init__(self, opts: Options, tally: Tally, stop: threading.Event) -> None:
        self.opts = opts
        self.tally = tally
        self.stop = stop
        self.rng = random.Random(opts.seed)
        run = uuid.uuid4().hex[:8]
        self.queue = f"canary-{run}"
        self.worker = f"canary-{run}-w"
        self.run = run
        self.client: Client | None = None
        self.last_submitted = 0

    def _client(self) -> Client:
        if self.client is None or not self.client.connected:
            if self.client is not None:
                self.tally.canary(False, "canary connection was lost (reconnecting)")
            self.client = Client(self.opts.host, self.opts.port, api_key=self.opts.api_key, timeout=10.0,
                                 client_name="fuzz-canary", tls=self.opts.tls, ca_file=self.opts.ca_file)
        return self.client

    def run_loop(self) -> None:
        rounds = [self.round_trip] * 6 + [self.priority_batch, self.fail_and_cancel, self.stats,
                                          self.abandoned_claim]
        n = 0
        beat_at = 0.0
        while not self.stop.is_set():
            check = rounds[n % len(rounds)]
            n += 1
            started = time.monotonic()
            try:
                if started >= beat_at:  # a worker silent for 2 x heartbeat is declared dead, its tasks reclaimed
                    self._client().heartbeat(self.worker, [])
                    beat_at = started + HEARTBEAT_EVERY_S
                problem = check(self._client())
            except (BrokerError, ClientError) as exc:
                problem = f"{check.__name__}: {type(exc).__name__}: {exc}"
            except Exception as exc:
                problem = f"{check.__name__}: unexpected {type(exc).__name__}: {exc}"
            elapsed = time.monotonic() - started
            if problem is None and elapsed > SLOW_CANARY_S and check != self.abandoned_claim:
                problem = f"{check.__name__}: took {elapsed:.1f} s"
            sleeps = check == self.abandoned_claim  # its own deliberate pauses are not latency
            self.tally.canary(problem is None, problem or "", None if sleeps else elapsed)
            self.stop.wait(0.05)

    def round_trip(self, c: Client) -> str | None:
        payload = self.rng.randbytes(self.rng.randrange(0, 4096))
        kind = f"canary.{self.rng.randrange(100)}"
        task_id = c.submit(kind, payload, queue=self.queue).task_id
        got = c.claim(self.worker, [self.queue], max_tasks=1, wait_ms=2000)
        if [a.task_id for a in got] != [task_id]:
            return f"round_trip: claimed {[a.task_id for a in got]}, expected [{task_id}]"
        a = got[0]
        if a.payload != payload or a.kind != kind or a.attempt != 1 or a.queue != self.queue:
            return f"round_trip: assignment differs from the submitted task: {a.kind} attempt {a.attempt}"
        result = hashlib.sha256(payload).digest()
        c.complete(self.worker, task_id, result)
        info = c.status(task_id)
        if info.state != "completed" or info.result != result or info.attempts != 1:
            return f"round_trip: status after RESULT is {info.state}, attempts {info.attempts}"
        return None

    def priority_batch(self, c: Client) -> str | None:
        tiers = ["low", "high", "normal", 7, 250]
        specs = [m.TaskSpec(kind="canary.batch", payload=str(i).encode(), queue=self.queue, priority=p)
                 for i, p in enumerate(tiers)]
        ids = c.submit_batch(specs)
        if len(ids) != len(specs) or len(set(ids)) != len(ids):
            return f"priority_batch: {len(ids)} ids for {len(specs)} tasks"
        got: list[m.Assignment] = []
        deadline = time.monotonic() + 5
        while len(got) < len(ids) and time.monotonic() < deadline:
            got += c.claim(self.worker, [self.queue], max_tasks=len(ids), wait_ms=500)
        prios = [a.priority for a in got]
        same = sorted(a.task_id for a in got) == sorted(ids)
        if not same or prios != sorted(prios, reverse=True):
            return f"priority_batch: claimed priorities {prios} (the submitted ids: {same})"
        for a in got:
            c.complete(self.worker, a.task_id)
        return None

    def fail_and_cancel(self, c: Client) -> str | None:
        failing = c.submit("canary.fail", b"f", queue=self.queue, max_retries=0).task_id
        got = c.claim(self.worker, [self.queue], wait_ms=2000)
        if [a.task_id for a in got] != [failing]:
            return f"fail_and_cancel: claimed {[a.task_id for a in got]}, expected [{failing}]"
        c.fail(self.worker, failing, "canary failure", retry=False)
        if (state := c.status(failing).state) != "failed":
            return f"fail_and_cancel: failed task is {state}"
        later = c.submit("canary.later", b"l", queue=self.queue, run_at=time.time() + 3600).task_id
        c.cancel(later)
        if (state := c.status(later).state) != "cancelled":
            return f"fail_and_cancel: cancelled task is {state}"
        return None

    def stats(self, c: Client) -> str | None:
        s = c.stats()
        if s.submitted_total < self.last_submitted:
            return f"stats: submitted_total went back from {self.last_submitted} to {s.submitted_total}"
        self.last_submitted = s.submitted_total
        mine = s.queues.get(self.queue)
        if mine is not None and (mine.pending or mine.running):
            return f"stats: canary queue should be empty, has {mine}"
        return None

    def abandoned_claim(self, c: Client) -> str | None:
        """A long-poll CLAIM whose connection died must not swallow the next task of its queue."""
        queue = f"{self.queue}-ab"
        raw = RawConn(self.opts, self.tally)
        raw.send(frame(REQ["CLAIM"], pack({"id": 9, "worker_id": f"{self.worker}-ghost", "queues": [queue],
                                            "max_tasks": 1, "wait_ms": 30_000})))
        time.sleep(0.05)  # let the broker park it before the connection goes
        raw.reset()
        # The broker cannot know of the reset before its reader sees it; under fuzz load that can take a
        # while, and a task handed to a dead waiter meanwhile is only back after its lease. Half a second
        # is far more than a responsive broker needs (it passes 200/200 unloaded with 50 ms).
        time.sleep(0.5)
        task_id = c.submit("canary.after-abandon", b"a", queue=queue).task_id
        got = c.claim(self.worker, [queue], wait_ms=3000)
        if [a.task_id for a in got] != [task_id]:
            info = c.status(task_id)
            return (f"abandoned_claim: task after an abandoned CLAIM went to {info.worker_id or 'nobody'} "
                    f"(state {info.state}) instead of the live worker")
        c.complete(self.worker, task_id)
        return None

    def final_checks(self) -> None:
        """After the fuzzing: a fresh connection works, and the fuzz connections are all gone."""
        try:
            with Client(self.opts.host, self.opts.port, api_key=self.opts.api_key, timeout=10.0,
                        tls=self.opts.tls, ca_file=self.opts.ca_file) as fresh:
                problem = self.round_trip(fresh)
                self.tally.canary(problem is None, f"final: {problem}")
                deadline = time.monotonic() + 10
                connections = fresh.stats().connections
                while connections > 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                    connections = fresh.stats().connections
                ok = connections <= 2  # this one and the canary's own
                self.tally.canary(ok, f"final: {connections} connections still open 10 s after the fuzzing")
        except (BrokerError, ClientError, OSError) as exc:
            self.tally.canary(False, f"final: fresh connection failed: {type(exc).__name__}: {exc}")
        if self.client is not None:
            self.client.close()
