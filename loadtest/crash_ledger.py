"""What the crash harness's load was told by the broker, and the check that none of it was lost.

`Ledger` records every acknowledged change across rounds and restarts; `verify` asks the restarted broker
(STATUS, pipelined, and STATS totals) whether each one is still there. Why apart from the load and the
CLI: this is the definition of "nothing acknowledged may be lost", which tests/test_durability.py uses
too, and it reads best on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from transport import messages as m
from transport.client import Client

WORKER_ID = "crash-worker"
LEASE_MS = 3_600_000  # leases outlive every round: a task claimed before a kill must come back running
STATUS_CHUNK = 1000


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


# ---------------------------------------------------------------------------------------------- verify


def matches(info: m.TaskInfo, outcome: tuple[str, bytes | str]) -> bool:
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
            if not matches(info, results[task_id]):
                problems.append(f"{task_id}: acknowledged RESULT said {state} {value!r}, STATUS says {info.state} "
                                f"result={info.result!r} error={info.error!r}")
        elif task_id in claimed:
            held = info.state == "running" and info.worker_id == WORKER_ID
            if not held and not (task_id in unsure and matches(info, claimed[task_id])):
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
