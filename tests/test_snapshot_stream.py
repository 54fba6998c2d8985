"""Snapshots copied a slice at a time while the queue keeps changing, and loaded a slice at a time.

The property tests drive the live side with the records the queue actor writes (applied the way it
applies them), copy the image in small slices between random changes, then recover as
storage.recovery does (image + replay of every record after the rotation, through msgpack like the WAL)
and compare with the live state. The broker tests do the same through the protocol.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from actors import snapshot_image
from actors.snapshot_image import SnapshotImage
from storage.db_process import DatabaseProcess
from storage.model import (
    Counters,
    DeadRemoved,
    LeasesRenewed,
    OpsState,
    TaskChanged,
    TaskDied,
    TaskFinished,
    TaskRecord,
    TasksRequeued,
    TaskState,
    TaskSubmitted,
    WalRecord,
    apply_record,
)
from transport import messages as m

_WAL = msgspec.msgpack.Decoder(WalRecord)


class _Live:
    """The live side: tasks and counters changed by records, as the queue actor changes them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.tasks: dict[str, TaskRecord] = {}
        self.counters = Counters()
        self.next_id = 0
        self.seq = 0

    def new_task(self) -> TaskRecord:
        self.next_id += 1
        self.seq += 1
        return TaskRecord(task_id=f"t{self.next_id:06d}", queue="q", kind="k", payload=b"p%d" % self.next_id,
                          priority=0, state=TaskState.PENDING, attempts=0, max_retries=3, lease_ms=1000,
                          submitted_at=1.0, run_at=1.0, ready_seq=self.seq)

    def random_record(self) -> WalRecord:
        """A record the queue actor could write now (its preconditions hold in the live state)."""
        rng = self.rng
        alive = [t for t in self.tasks.values() if t.state != TaskState.FAILED]
        dead = [t.task_id for t in self.tasks.values() if t.state == TaskState.FAILED]
        choice = rng.random()
        if choice < 0.2 or not alive:
            return TaskSubmitted(task=self.new_task())
        task = rng.choice(alive)
        if choice < 0.45:
            self.seq += 1
            running = rng.random() < 0.5
            return TaskChanged(task_id=task.task_id, state=TaskState.RUNNING if running else TaskState.PENDING,
                               attempts=task.attempts + 1, run_at=rng.random(), ready_seq=self.seq,
                               worker_id="w1" if running else None, started_at=rng.random() if running else None,
                               lease_expires_at=rng.random() if running else None, error=None,
                               retried=not running)
        if choice < 0.55:
            return LeasesRenewed(task_ids=[task.task_id], lease_expires_at=[rng.random()])
        if choice < 0.7:
            state = rng.choice([TaskState.COMPLETED, TaskState.CANCELLED, TaskState.FAILED])
            return TaskFinished(task_id=task.task_id, state=state, attempts=task.attempts, finished_at=rng.random(),
                                worker_id="w1", result=b"r", error=None)
        if choice < 0.85:
            return TaskDied(task_id=task.task_id, attempts=task.attempts + 1, finished_at=rng.random(),
                            worker_id="w2", error="boom")
        if dead and choice < 0.95:
            picked = rng.sample(dead, rng.randint(1, len(dead)))
            self.seq += len(picked)
            return TasksRequeued(task_ids=picked, first_seq=self.seq - len(picked) + 1, at=rng.random())
        if dead:
            return DeadRemoved(task_ids=rng.sample(dead, rng.randint(1, len(dead))))
        return TaskSubmitted(task=self.new_task())

    def change(self) -> bytes:
        """Makes one random change; returns its record as the WAL holds it (msgpack)."""
        record = self.random_record()
        encoded = msgspec.msgpack.encode(record)
        apply_record(record, self.tasks, self.counters)
        return encoded


def _snapshot_while_changing(seed: int) -> tuple[_Live, list[TaskRecord], Counters, list[bytes]]:
    """Builds a live state, rotates, copies the image in slices with random changes between them."""
    rng = random.Random(seed)
    live = _Live(rng)
    for _ in range(rng.randint(20, 80)):
        live.change()
    image = SnapshotImage()
    counters, count = image.start(live.tasks, live.counters)
    after_rotation: list[bytes] = []
    copies: list[TaskRecord] = []
    while len(copies) < count:
        for _ in range(rng.randint(0, 6)):
            after_rotation.append(live.change())
        copies += image.copy_slice(len(copies))
    for _ in range(rng.randint(0, 10)):
        after_rotation.append(live.change())
    return live, copies, counters, after_rotation


def _recover(copies: list[TaskRecord], counters: Counters, records: list[bytes],
             as_written: bool) -> tuple[dict, Counters]:
    tasks = {t.task_id: msgspec.structs.replace(t) for t in copies}
    counters = msgspec.structs.replace(counters)
    for encoded in records:
        apply_record(_WAL.decode(encoded), tasks, counters, OpsState(), as_written=as_written)
    return tasks, counters


@pytest.mark.parametrize("seed", range(300))
def test_recovery_from_an_image_copied_between_changes_equals_the_live_state(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_image, "COPY_SLICE_TASKS", 1 + seed % 7)
    live, copies, counters, records = _snapshot_while_changing(seed)
    tasks, recovered = _recover(copies, counters, records, as_written=True)
    assert tasks == live.tasks
    assert recovered == live.counters


def test_replaying_with_the_idempotent_checks_over_such_an_image_would_miscount(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Why recovery replays `as_written`: the default replay skips a death it finds already applied."""
    monkeypatch.setattr(snapshot_image, "COPY_SLICE_TASKS", 2)
    wrong = 0
    for seed in range(100):
        live, copies, counters, records = _snapshot_while_changing(seed)
        tasks, recovered = _recover(copies, counters, records, as_written=False)
        wrong += (tasks, recovered) != (live.tasks, live.counters)
    assert wrong > 0


def test_a_slice_copy_does_not_change_when_the_live_task_changes_later() -> None:
    live = _Live(random.Random(1))
    for _ in range(5):
        live.change()
    image = SnapshotImage()
    _, count = image.start(live.tasks, live.counters)
    copies = image.copy_slice(0)
    before = [msgspec.msgpack.encode(t) for t in copies]
    for task in live.tasks.values():
        task.attempts += 100
    assert [msgspec.msgpack.encode(t) for t in copies] == before
    assert len(copies) == count


def test_the_database_process_loads_a_snapshot_of_many_slices_one_slice_at_a_time(tmp_path: Path) -> None:
    live = _Live(random.Random(2))
    tasks = [live.new_task() for _ in range(2_500)]
    db = DatabaseProcess(tmp_path / "tq.duckdb")
    try:
        client = db.snapshots
        snapshot_id = client.begin()
        for start in range(0, len(tasks), 1_000):  # three CopySlice-sized pieces, each a slice table
            client.append(snapshot_id, tasks[start:start + 1_000])
        client.commit(snapshot_id, Counters(submitted_total=7), 4, len(tasks))
        head = db.call("snapshot_slices")
        assert head[3] == len(tasks) and len(head[4]) == 4  # slice 0 (empty) + three slices
        assert client.load_latest() == (tasks, Counters(submitted_total=7), 4)
    finally:
        db.close()


def test_a_broker_killed_after_snapshots_taken_under_load_restarts_with_every_task_and_count(
        make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS="0.1")
    c = broker.client()
    states: dict[str, str] = {}
    while broker.log().count("snapshot of") < 3:  # changes keep arriving between PrepareSnapshot and CopySlice
        for task_id in c.submit_batch([m.TaskSpec(kind="k", payload=b"x" * 20, queue="q") for _ in range(50)]):
            states[task_id] = "pending"
        for task in c.claim("w1", ["q"], max_tasks=20):
            states[task.task_id] = "running"
        for task_id in [t for t, s in states.items() if s == "running"][:15]:
            c.complete("w1", task_id, b"ok")
            states[task_id] = "completed"
    before = c.stats()
    broker.kill()
    c = broker.restart().client()
    after = c.stats()
    assert (after.pending, after.running, after.submitted_total, after.completed_total) == (
        before.pending, before.running, before.submitted_total, before.completed_total)
    sample = random.Random(0).sample(sorted(states), 40)
    assert {t: c.status(t).state for t in sample} == {t: states[t] for t in sample}
