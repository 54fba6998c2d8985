"""Crash harness: SIGKILL the broker again and again under pipelined load; nothing acknowledged may be lost.

    python -m loadtest.crash_harness --kills 20

It starts its own broker (`python -m actors`) on a free port and a temp data dir, and per round:

1. starts (or restarts, same port and data dir) the broker and times recovery: from spawning the
   process until a STATS request is answered;
2. checks with STATUS that every change acknowledged so far is there (see `verify`);
3. runs pipelined load from two client threads: a producer keeps ~100 SUBMITs (and some SUBMIT_BATCHes)
   in flight, a worker CLAIMs, HEARTBEATs and pipelines RESULTs (most ok with result bytes, some failed
   without retry), and both write what the broker acknowledged into a `Ledger`;
4. SIGKILLs the broker at a random moment of that load.

After the last kill it restarts once more and checks everything, then stops the broker with SIGTERM
(a final snapshot), starts it again and checks everything once more. Prints recovery time per restart
and totals; exits 1 on any lost or damaged acknowledged change, or a recovery slower than
`--max-recovery` seconds (PROTOCOL.md "Durability": a broker killed at any moment and restarted loses no
acknowledged change; running tasks come back running with their leases, and their worker may finish them).

`Ledger`, `LoadRound` and `verify` are also used by tests/test_durability.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transport import messages as m
from transport.client import Client, PendingReply
from transport.errors import BrokerError, ClientError, NotLeased, RequestTimeout

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "crash"
WORKER_ID = "crash-worker"
WINDOW = 100  # SUBMITs in flight at once
RESULT_WINDOW = 300  # RESULTs in flight at once
BACKLOG_CAP = 20_000  # the producer waits while this many acknowledged tasks are unfinished
LEASE_MS = 3_600_000  # leases outlive every round: a task claimed before a kill must come back running
FAIL_EVERY = 29  # every 29th claimed task gets RESULT ok=false retry=false
SCHEDULE_EVERY = 97  # every 97th submit is scheduled an hour ahead
BATCH_EVERY = 50  # every 50th request is a SUBMIT_BATCH of BATCH_SIZE
BATCH_SIZE = 5
HOLD_EVERY = 5  # every 5th claimed task is "slow": its RESULT is sent HOLD_S later, so kills find tasks running
HOLD_S = 1.5
HEARTBEAT_EVERY_S = 0.5
STATUS_CHUNK = 1000
_LOST = (ClientError, RequestTimeout)


def payload_for(kind: str) -> bytes:
    """A payload derivable from the kind, so a worker can tell a damaged one."""
    return (kind.encode() * 12)[:100]


def result_for(task_id: str) -> bytes:
    return b"result:" + task_id.encode()


def error_for(task_id: str) -> str:
    return f"failed on purpose: {task_id}"


class Ledger:
    """What the broker acknowledged, across rounds and restarts.

    - `submitted`: task id -> its run_at if it was submitted scheduled (an hour ahead), else None.
    - `results`: acknowledged RESULTs: task id -> ("completed", result bytes) or ("failed", error).
    - `claimed`: tasks whose ASSIGNED came back and whose RESULT was not acknowledged (yet): task id ->
      the RESULT the worker sends for it. They must be running, held by WORKER_ID, after a restart...
    - `unsure`: ...unless their RESULT was sent and its reply lost with the connection: then either.
    - `cancelled`: acknowledged CANCELs; `cancel_sent`: every CANCEL sent (acknowledged or not).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted: dict[str, float | None] = {}
        self.results: dict[str, tuple[str, bytes | str]] = {}
        self.claimed: dict[str, tuple[str, bytes | str]] = {}
        self.unsure: set[str] = set()
        self.cancelled: set[str] = set()  # acknowledged CANCELs (of tasks submitted scheduled)
        self.cancel_sent: set[str] = set()  # CANCELs sent; unacknowledged ones may or may not have landed
        self.anomalies: list[str] = []  # wrong replies seen during load (damaged payload, lost lease)
        self.round_ids: set[str] = set()  # ids acknowledged in the current round
        self.refused = 0  # submits answered with an ERROR (QUEUE_FULL, ...): not acknowledged

    def start_round(self) -> None:
        with self.lock:
            self.round_ids = set()

    def backlog(self) -> int:
        return len(self.submitted) - len(self.results)

    def add_submitted(self, task_id: str, run_at: float | None) -> None:
        with self.lock:
            self.submitted[task_id] = run_at
            self.round_ids.add(task_id)

    def add_claimed(self, task_id: str, outcome: tuple[str, bytes | str]) -> None:
        with self.lock:
            self.claimed[task_id] = outcome
            self.round_ids.add(task_id)

    def add_result(self, task_id: str) -> None:
        with self.lock:
            outcome = self.claimed.pop(task_id, None)
            self.unsure.discard(task_id)
            if outcome is not None:
                self.results[task_id] = outcome
                self.round_ids.add(task_id)

    def add_cancelled(self, task_id: str) -> None:
        with self.lock:
            self.cancelled.add(task_id)
            self.round_ids.add(task_id)

    def anomaly(self, text: str) -> None:
        with self.lock:
            if len(self.anomalies) < 1000:
                self.anomalies.append(text)


# ---------------------------------------------------------------------------------------------- load


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
        if expected is not None and _matches(info, expected):
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


# ---------------------------------------------------------------------------------------------- verify


def _matches(info: m.TaskInfo, outcome: tuple[str, bytes | str]) -> bool:
    state, value = outcome
    if info.state != state:
        return False
    return info.result == value if state == "completed" else info.error == value


def _statuses(client: Client, ids: list[str]) -> dict[str, m.TaskInfo | Exception]:
    found: dict[str, m.TaskInfo | Exception] = {}
    for start in range(0, len(ids), STATUS_CHUNK):
        chunk = ids[start : start + STATUS_CHUNK]
        replies = client.pipeline([m.Status(id=0, task_id=t) for t in chunk], return_exceptions=True, timeout=120)
        for task_id, reply in zip(chunk, replies, strict=True):
            found[task_id] = reply.task if isinstance(reply, m.TaskStatus) else reply
    return found


def verify(client: Client, ledger: Ledger, ids: Iterable[str] | None = None) -> tuple[int, list[str]]:
    """Checks the acknowledged changes of `ids` (default: all) with STATUS; returns (checked, problems).

    - an acknowledged SUBMIT: the task exists; one submitted scheduled is still scheduled at its run_at;
    - an acknowledged RESULT: the task is completed with those result bytes (or failed with that error);
    - an acknowledged CANCEL: cancelled (an unacknowledged one: scheduled or cancelled);
    - an acknowledged ASSIGNED without an acknowledged RESULT: running, held by WORKER_ID; if the RESULT
      was sent but its reply lost, it may instead be finished exactly as that RESULT said.
    Also STATS totals cover at least the acknowledged submits, completions and failures.
    """
    with ledger.lock:
        wanted = list(ledger.submitted if ids is None else ids)
        wanted += [t for t in ledger.claimed if t not in ledger.submitted]
        submitted, results = dict(ledger.submitted), dict(ledger.results)
        claimed, unsure = dict(ledger.claimed), set(ledger.unsure)
        cancelled, cancel_sent = set(ledger.cancelled), set(ledger.cancel_sent)
    wanted = list(dict.fromkeys(wanted))
    problems: list[str] = []
    for task_id, info in _statuses(client, wanted).items():
        if isinstance(info, Exception):
            problems.append(f"{task_id}: STATUS answered {info!r}")
            continue
        if task_id in results:
            state, value = results[task_id]
            if not _matches(info, results[task_id]):
                problems.append(f"{task_id}: acknowledged RESULT said {state} {value!r}, STATUS says {info.state} "
                                f"result={info.result!r} error={info.error!r}")
        elif task_id in claimed:
            held = info.state == "running" and info.worker_id == WORKER_ID
            if not held and not (task_id in unsure and _matches(info, claimed[task_id])):
                problems.append(f"{task_id}: claimed by {WORKER_ID} (lease {LEASE_MS} ms) but STATUS says "
                                f"{info.state} held by {info.worker_id}")
        elif task_id in cancelled:
            if info.state != "cancelled":
                problems.append(f"{task_id}: acknowledged CANCEL, STATUS says {info.state}")
        elif submitted.get(task_id) is not None:
            run_at = submitted[task_id]
            allowed = ("scheduled", "cancelled") if task_id in cancel_sent else ("scheduled",)
            if info.state not in allowed or abs(info.run_at - run_at) > 0.001:  # type: ignore[operator]
                problems.append(f"{task_id}: submitted scheduled at {run_at}, STATUS says {info.state} at "
                                f"{info.run_at}")
    stats = client.stats()
    completed = sum(1 for state, _ in results.values() if state == "completed")
    for name, least in (("submitted_total", len(submitted)), ("completed_total", completed),
                        ("failed_total", len(results) - completed), ("cancelled_total", len(cancelled))):
        if getattr(stats, name) < least:
            problems.append(f"STATS {name} is {getattr(stats, name)}, but {least} were acknowledged")
    return len(wanted), problems


# ---------------------------------------------------------------------------------------------- broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """`python -m actors` on a fixed port and data dir, restartable; its output goes to `log_path`."""

    def __init__(self, data_dir: Path, settings: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}-broker.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
        self.env.update({
            "PYTHONPATH": str(ROOT),
            "TQ_BROKER__HOST": "127.0.0.1",
            "TQ_BROKER__PORT": str(self.port),
            "TQ_PERSISTENCE__DATA_DIR": str(data_dir),
            "TQ_MONITORING__PROMETHEUS_PORT": "0",
            "TQ_WORKER__HEARTBEAT_INTERVAL_SECS": "3600",  # the harness worker is never declared dead
            **(settings or {}),
        })
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "actors"], cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def start(self, timeout: float = 120.0) -> float:
        """Spawns the broker; returns the seconds until it answered STATS (its recovery time)."""
        started = time.monotonic()
        self.spawn()
        assert self.proc is not None
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with Client("127.0.0.1", self.port, timeout=timeout) as client:
                    client.stats()
                return time.monotonic() - started
            except ClientError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"broker did not answer within {timeout} s; see {self.log_path}") from None
                time.sleep(0.01)  # polling for the listener

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def rss_bytes(self) -> int:
        """Resident memory of the broker process (from /proc), 0 if unknown."""
        if self.proc is None:
            return 0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def last_recovery_line(self) -> str:
        """The broker's own 'recovered N live tasks ...' log message of its latest start."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            if "recovered" in line:
                try:
                    return str(json.loads(line).get("msg", line))
                except ValueError:
                    return line
        return ""


# ---------------------------------------------------------------------------------------------- main


def _parse_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("TQ_"):
            raise SystemExit(f"--set takes TQ_SECTION__KEY=VALUE, not {pair!r}")
        settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.crash_harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs under load (default 20)")
    parser.add_argument("--min-delay", type=float, default=0.2, help="earliest kill after the first ack, seconds")
    parser.add_argument("--max-delay", type=float, default=2.0, help="latest kill after the first ack, seconds")
    parser.add_argument("--rate", type=float, default=2000, help="SUBMITs per second at most, 0 = unlimited")
    parser.add_argument("--result-rate", type=float, default=1000,
                        help="RESULTs per second at most, 0 = unlimited (STATUS of a task finished before a "
                             "restart reads DuckDB at a few hundred per second, so checking costs more than loading)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the kill moments")
    parser.add_argument("--max-recovery", type=float, default=15.0, help="fail if a recovery takes longer (s)")
    parser.add_argument("--full-verify", action="store_true",
                        help="check every acknowledged change after every restart (default: the round's, a "
                             "sample of older ones, and everything at the end)")
    parser.add_argument("--sample", type=int, default=2000, help="older changes re-checked per restart")
    parser.add_argument("--set", action="append", default=[], metavar="TQ_SECTION__KEY=VALUE",
                        help="broker setting for every start, e.g. TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS=0.5")
    parser.add_argument("--data-dir", help="use (and keep) this data dir instead of a temporary one")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    temp = None if args.data_dir else tempfile.mkdtemp(prefix="tq-crash-")
    data_dir = Path(args.data_dir) if args.data_dir else Path(temp) / "data"  # type: ignore[arg-type]
    broker = Broker(data_dir, _parse_settings(args.set))
    ledger = Ledger()
    recoveries: list[float] = []
    problems: list[str] = []
    print(f"crash harness: {args.kills} kills, seed {seed}, data dir {data_dir}, broker log {broker.log_path}")
    try:
        for round_no in range(1, args.kills + 1):
            seconds = broker.start()
            if round_no > 1:
                recoveries.append(seconds)
                checked, found = _check(broker, ledger, args, rng, full=args.full_verify)
                problems += found
                print(f"restart {round_no - 1:>2}/{args.kills}: answered STATS after {seconds:.2f} s "
                      f"[{broker.last_recovery_line()}]; checked {checked} changes, {len(found)} problems",
                      flush=True)
            delay = rng.uniform(args.min_delay, args.max_delay)
            load = LoadRound("127.0.0.1", broker.port, ledger, tag=f"r{round_no}", rate=args.rate,
                             result_rate=args.result_rate)
            load.run(broker.kill, delay)
            print(f"round   {round_no:>2}/{args.kills}: SIGKILL {delay:.2f} s into the load; acknowledged so far: "
                  f"{len(ledger.submitted)} submits, {len(ledger.results)} results, {len(ledger.claimed)} running",
                  flush=True)
        seconds = broker.start()
        recoveries.append(seconds)
        checked, found = _check(broker, ledger, args, rng, full=True)
        problems += found
        print(f"restart {args.kills:>2}/{args.kills}: answered STATS after {seconds:.2f} s "
              f"[{broker.last_recovery_line()}]; checked ALL {checked} changes, {len(found)} problems", flush=True)
        status = broker.terminate()
        seconds = broker.start()
        checked, found = _check(broker, ledger, args, rng, full=True)
        problems += found
        print(f"after SIGTERM (exit {status}) and a start: answered STATS after {seconds:.2f} s; checked ALL "
              f"{checked} changes, {len(found)} problems", flush=True)
        broker.terminate()
    except Exception:
        broker.kill()
        raise
    problems += ledger.anomalies
    slow = [s for s in recoveries if s > args.max_recovery]
    completed = sum(1 for state, _ in ledger.results.values() if state == "completed")
    print()
    print(f"kills: {args.kills}; acknowledged: {len(ledger.submitted)} submits ({ledger.refused} refused), "
          f"{len(ledger.results)} results ({completed} completed, {len(ledger.results) - completed} failed), "
          f"{len(ledger.claimed)} still running, {len(ledger.cancelled)} cancels")
    print(f"recovery (spawn -> STATS answered): min {min(recoveries):.2f} s, mean "
          f"{sum(recoveries) / len(recoveries):.2f} s, max {max(recoveries):.2f} s (limit {args.max_recovery:g} s)")
    print(f"lost or damaged acknowledged changes: {len(problems)}")
    for problem in problems[:20]:
        print("  " + problem)
    if temp is not None and not problems and not slow:
        shutil.rmtree(temp, ignore_errors=True)
    elif temp is not None:
        print(f"data dir and broker log kept in {temp}")
    if problems or slow:
        print("FAIL")
        return 1
    print("OK")
    return 0


def _check(broker: Broker, ledger: Ledger, args: Any, rng: random.Random, full: bool) -> tuple[int, list[str]]:
    with Client("127.0.0.1", broker.port, timeout=120.0, client_name="crash-verify") as client:
        if full:
            return verify(client, ledger)
        with ledger.lock:
            older = [t for t in ledger.submitted if t not in ledger.round_ids]
            ids = list(ledger.round_ids) + rng.sample(older, min(args.sample, len(older)))
        return verify(client, ledger, ids)


if __name__ == "__main__":
    sys.exit(main())
