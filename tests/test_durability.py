"""Durability, recovery and storage faults, against a real broker subprocess (tests/conftest.py).

Written from docs/protocol.md "Task states", durability (an acknowledged SUBMIT, RESULT or CANCEL is in the
WAL before its reply; a broker killed at any moment and restarted loses none; running tasks come back running
with their leases), the README's "Durability" (WAL segments with a CRC per record, torn tail cut on recovery;
snapshot + deletion of older segments; history retention) and the issue's faults: disk full (ERROR INTERNAL
"disk full: ...", reads go on, writes resume when space returns), a locked or unwritable data dir (exit 1 with
one line naming the path). The 20-kill version of the first test is `python -m loadtest.crash_harness`.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, BrokerProcess, free_port
from helpers import wait_for

from loadtest.crash_harness import Ledger, LoadRound, verify
from storage.wal import list_segments, wal_directory
from transport import messages as m
from transport.client import Client
from transport.errors import InternalError, NotFound
from transport.messages import Claim

FAST_STORAGE = {
    "TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "0.5",
    "TQ_PERSISTENCE__WAL_SEGMENT_BYTES": "65536",
    "TQ_PERSISTENCE__COMPACT_INTERVAL_SECS": "0.5",
}
NO_DEAD_WORKERS = {"TQ_WORKER__HEARTBEAT_INTERVAL_SECS": "3600"}
DB_FILE = "tqbroker.duckdb"




def one(tasks: list[m.Assignment]) -> m.Assignment:
    assert len(tasks) == 1, tasks
    return tasks[0]


def wal_segments(data_dir: Path) -> list[tuple[int, Path]]:
    return list_segments(wal_directory(data_dir))


def wal_bytes(data_dir: Path) -> int:
    total = 0
    for _, path in wal_segments(data_dir):
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # deleted by the compactor meanwhile
            pass
    return total


def restart_timed(broker: BrokerProcess) -> tuple[Client, float]:
    """Restarts (same port and data dir) and returns a client and the seconds until STATS was answered."""
    started = time.monotonic()
    broker.restart()
    client = broker.client(timeout=30.0)
    client.stats()
    return client, time.monotonic() - started


def is_json_log(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def broker_env(data_dir: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    base.update({"PYTHONPATH": str(ROOT), "TQ_PERSISTENCE__DATA_DIR": str(data_dir), "TQ_BROKER__HOST": "127.0.0.1",
                 "TQ_BROKER__PORT": str(free_port()), "TQ_MONITORING__PROMETHEUS_PORT": "0",
                 "TQ_API__REST_PORT": "0", **env})
    return base


def failed_start(data_dir: Path, **env: str) -> str:
    """Runs `python -m actors`, expects exit status 1, and returns its one plain (non-log) stderr line."""
    result = subprocess.run([sys.executable, "-m", "actors"], cwd=ROOT, env=broker_env(data_dir, **env),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)
    plain = [line for line in result.stderr.splitlines() if line.strip() and not is_json_log(line)]
    assert len(plain) == 1, result.stderr
    return plain[0]


def mount_tmpfs(directory: Path, options: str) -> None:
    """Mounts a tmpfs (root only), or skips the test saying why it cannot."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (mount -t tmpfs) for this fault")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {result.stderr.strip()}")


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


# ---------------------------------------------------------------- SIGKILL under pipelined load


def test_a_broker_sigkilled_three_times_under_pipelined_submits_and_results_loses_no_acknowledged_change(
    make_broker: Any,
) -> None:
    broker = make_broker(**FAST_STORAGE, **NO_DEAD_WORKERS)
    ledger = Ledger()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for round_no in range(3):
        acknowledged = len(ledger.submitted), len(ledger.results)
        # paced so that checking (STATUS of a task finished before a restart reads DuckDB) stays quick
        LoadRound("127.0.0.1", broker.port, ledger, tag=f"t{round_no}", rate=3000, result_rate=300).run(
            broker.kill, rng.uniform(0.2, 1.0))
        assert len(ledger.submitted) > acknowledged[0], "no SUBMIT was acknowledged before the kill"
        client, seconds = restart_timed(broker)
        assert seconds < 15, f"recovery took {seconds:.1f} s"
        _, problems = verify(client, ledger)
        assert problems == [], (f"seed {seed}, round {round_no}", problems[:10])
        assert ledger.anomalies == [], (f"seed {seed}, round {round_no}", ledger.anomalies[:10])
    assert len(ledger.results) > acknowledged[1], "no RESULT was acknowledged in the last round"


# ---------------------------------------------------------------- torn WAL tail


def _half_record(path: Path, number: int) -> None:
    with open(path, "ab") as f:
        f.write(struct.pack(">II", 500, 0) + b"\x81\xa4half")  # announces 500 bytes, has 7


def _garbage(path: Path, number: int) -> None:
    with open(path, "ab") as f:
        f.write(random.Random(number).randbytes(37))


def _bad_checksum(path: Path, number: int) -> None:
    payload = b"\x82\xa4type\xa9submitted\xa4task\xc0"
    with open(path, "ab") as f:
        f.write(struct.pack(">II", len(payload), zlib.crc32(payload) ^ 0xFFFF) + payload)


def _torn_new_segment_header(path: Path, number: int) -> None:
    (path.parent / f"wal-{number + 1:010d}.log").write_bytes(b"TQW")


@pytest.mark.parametrize("damage", [_half_record, _garbage, _bad_checksum, _torn_new_segment_header],
                         ids=["half-a-record", "garbage", "bad-checksum", "torn-header-of-a-new-segment"])
def test_a_torn_wal_tail_is_cut_on_restart_and_every_acknowledged_change_before_it_survives(
    make_broker: Any, damage: Callable[[Path, int], None],
) -> None:
    broker = make_broker()
    c = broker.client()
    queue = f"torn-{uuid.uuid4().hex[:8]}"
    ids = c.submit_batch([m.TaskSpec(kind="torn", payload=bytes([i]) * 50, queue=queue) for i in range(20)])
    done = one(c.claim("torn-w", [queue])).task_id
    c.complete("torn-w", done, b"before the tear")
    broker.kill()
    number, path = wal_segments(broker.data_dir)[-1]
    damage(path, number)

    c = broker.restart().client()
    assert [c.status(t).state for t in ids].count("pending") == 19
    assert (c.status(done).state, c.status(done).result) == ("completed", b"before the tear")
    assert "cutting" in broker.log(), "recovery did not say it cut a torn tail"
    later = c.submit("torn", b"after the repair", queue=queue).task_id

    broker.kill()
    c = broker.restart().client()  # the repaired segment reads cleanly; new changes went to a later one
    assert c.status(later).state == "pending"
    claimed = claim_all(c, "torn-w2", queue)
    expected = {t: bytes([i]) * 50 for i, t in enumerate(ids) if t != done}
    assert {a.task_id: a.payload for a in claimed} == {**expected, later: b"after the repair"}


def _flip_a_byte_in_the_first_segment(segments: list[tuple[int, Path]]) -> Path:
    path = segments[0][1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _remove_a_middle_segment(segments: list[tuple[int, Path]]) -> Path:
    path = segments[len(segments) // 2][1]
    path.unlink()
    return path


@pytest.mark.parametrize("damage", [_flip_a_byte_in_the_first_segment, _remove_a_middle_segment],
                         ids=["damaged-older-segment", "missing-middle-segment"])
def test_damage_before_the_wal_tail_stops_the_start_with_one_line_naming_the_segment(
    make_broker: Any, damage: Callable[[list[tuple[int, Path]]], Path],
) -> None:
    broker = make_broker(TQ_PERSISTENCE__WAL_SEGMENT_BYTES="1024")  # acknowledged changes sit behind it
    broker.client().submit_batch([m.TaskSpec(kind="damage", payload=b"d" * 100, queue="damage") for _ in range(10)])
    for _ in range(10):
        broker.client().submit("damage", b"d" * 100, queue="damage")
    broker.kill()
    segments = wal_segments(broker.data_dir)
    assert len(segments) >= 3, segments
    path = damage(segments)
    line = failed_start(broker.data_dir)
    assert str(path) in line, line


# ---------------------------------------------------------------- running and scheduled tasks


def test_running_tasks_come_back_running_with_their_leases_and_their_worker_may_finish_them(
    make_broker: Any,
) -> None:
    broker = make_broker(**NO_DEAD_WORKERS)
    c = broker.client()
    held = c.submit("run", b"held", queue="held", lease_ms=600_000).task_id
    held_assignment = one(c.claim("w-held", ["held"]))
    lapsed = c.submit("run", b"lapsed", queue="lapsed", lease_ms=300).task_id
    one(c.claim("w-lapsed", ["lapsed"]))
    renewed = c.submit("run", b"renewed", queue="renewed", lease_ms=2500).task_id
    first_expiry = one(c.claim("w-renew", ["renewed"])).lease_expires_at
    wait_for(lambda: time.time() > first_expiry - 0.5, timeout=5)  # half a second before its first lease ends
    heartbeat_sent = time.time()
    c.heartbeat("w-renew", [renewed])  # renews it to about heartbeat_sent + 2.5 s
    before = c.status(held)
    broker.kill()

    c, _ = restart_timed(broker)
    wait_for(lambda: time.time() > first_expiry + 0.1, timeout=5)  # without the renewal it would be pending now
    after = c.status(held)
    assert (after.state, after.worker_id, after.attempts) == ("running", "w-held", 1)
    assert after.started_at == pytest.approx(before.started_at, abs=0.001)
    assert held_assignment.attempt == 1
    if time.time() < heartbeat_sent + 2.3:  # the restart was quicker than the renewed lease (the usual case)
        assert c.status(renewed).state == "running", "the lease renewed by HEARTBEAT before the kill was lost"
    became_pending = wait_for(lambda: c.status(renewed).state == "pending" and time.time(), timeout=10)
    assert became_pending >= heartbeat_sent + 2.5 - 0.05, "the lease expired before its renewed expiry"

    info = wait_for(lambda: (i := c.status(lapsed)).state == "pending" and i, timeout=5)
    assert (info.attempts, info.worker_id) == (1, None)  # the lapsed run counted
    again = one(c.claim("w-other", ["lapsed"]))
    assert (again.task_id, again.attempt, again.payload) == (lapsed, 2, b"lapsed")

    c.complete("w-held", held, b"finished after the restart")
    done = c.status(held)
    assert (done.state, done.result, done.worker_id) == ("completed", b"finished after the restart", "w-held")


def test_scheduled_tasks_survive_a_restart_and_become_claimable_when_due(make_broker: Any) -> None:
    broker = make_broker(TQ_BROKER__RETRY_BACKOFF_BASE_MS="600000", TQ_BROKER__RETRY_BACKOFF_MAX_MS="600000",
                         **NO_DEAD_WORKERS)
    c = broker.client()
    far_run_at = time.time() + 3600
    far = c.submit("sched", queue="far", run_at=far_run_at).task_id
    soon_run_at = time.time() + 1.0
    soon = c.submit("sched", b"soon", queue="soon", run_at=soon_run_at).task_id
    retrying = c.submit("sched", queue="retry", max_retries=3).task_id
    one(c.claim("w-retry", ["retry"]))
    c.fail("w-retry", retrying, "transient")
    retry_before = c.status(retrying)
    broker.kill()

    c, _ = restart_timed(broker)
    info = c.status(far)
    assert (info.state, info.run_at) == ("scheduled", pytest.approx(far_run_at, abs=0.001))
    info = c.status(retrying)
    assert (info.state, info.attempts, info.error) == ("scheduled", 1, "transient")
    assert info.run_at == pytest.approx(retry_before.run_at, abs=0.001)
    assigned = one(c.claim("w-soon", ["soon"], wait_ms=10_000))
    claimed_at = time.time()
    assert (assigned.task_id, assigned.payload) == (soon, b"soon")
    assert claimed_at >= soon_run_at - 0.01
    assert c.claim("w-far", ["far"]) == []


def test_a_graceful_stop_writes_a_snapshot_so_the_next_start_replays_no_wal(make_broker: Any) -> None:
    broker = make_broker()
    c = broker.client()
    ids = c.submit_batch([m.TaskSpec(kind="graceful", queue="graceful") for _ in range(50)])
    assert broker.terminate() == 0
    c = broker.restart().client()
    assert {c.status(t).state for t in ids} == {"pending"}
    recovered = [line for line in broker.log().splitlines() if "recovered" in line][-1]
    assert "50 from the snapshot" in recovered and " 0 WAL records replayed" in recovered, recovered


def test_a_sigterm_during_start_up_still_stops_the_broker_cleanly(make_broker: Any) -> None:
    broker = make_broker()
    broker.client().submit_batch([m.TaskSpec(kind="startup", queue="s") for _ in range(1000)])
    broker.kill()
    broker.start()  # returns once the port accepts: the broker may still be recovering
    assert broker.terminate() == 0, "SIGTERM right after the port opened was not handled as a clean stop"


# ---------------------------------------------------------------- snapshots, WAL rotation, retention


def test_snapshots_and_segment_rotation_keep_the_wal_bounded_under_load(make_broker: Any) -> None:
    broker = make_broker(**FAST_STORAGE, **NO_DEAD_WORKERS)
    ledger = Ledger()
    largest: dict[int, int] = {}  # segment number -> largest size seen: their sum is what was written
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for number, path in wal_segments(broker.data_dir):
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                largest[number] = max(largest.get(number, 0), size)
                total += size
            peak[0] = max(peak[0], total)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    LoadRound("127.0.0.1", broker.port, ledger, tag="bounded").run(lambda: None, 4.0)
    written = sum(largest.values())
    wait_for(lambda: len(wal_segments(broker.data_dir)) <= 2, timeout=5)  # the next snapshot drops the rest
    stop.set()
    sampler.join()
    assert written > 5_000_000, f"the load wrote only {written} WAL bytes; the test proves nothing"
    # bounded by (snapshot interval + snapshot time) x write rate, not by what was written
    assert peak[0] < 0.6 * written, f"WAL reached {peak[0]} bytes after {written} written"
    assert len(largest) > 20, "the WAL did not rotate"

    broker.kill()
    client, _ = restart_timed(broker)  # the snapshot + the WAL after it hold everything (a sample is checked:
    sample = random.sample(sorted(ledger.submitted), min(1000, len(ledger.submitted)))  # STATUS of a finished
    _, problems = verify(client, ledger, sample)  # task reads DuckDB, a few hundred per second)
    assert problems == [], problems[:10]


def test_history_past_retention_is_deleted_and_history_within_it_is_kept(make_broker: Any) -> None:
    broker = make_broker(TQ_PERSISTENCE__COMPACT_INTERVAL_SECS="0.3")  # retention: the default 7 days
    c = broker.client()
    ids = c.submit_batch([m.TaskSpec(kind="retention", queue="retention") for _ in range(3)])
    for a in c.claim("w-ret", ["retention"], max_tasks=3):
        c.complete("w-ret", a.task_id, b"kept for now")
    count = "SELECT count(*) FROM task_history WHERE queue = 'retention'"
    wait_for(lambda: c.query(count)[1] == [[3]])
    wait_for(lambda: c.stats().uptime_s > 1.0)  # a few compaction rounds have run
    assert c.query(count)[1] == [[3]]
    assert broker.terminate() == 0

    broker.env["TQ_PERSISTENCE__COMPLETED_TASK_RETENTION_DAYS"] = "0.00001"  # 0.864 s
    c = broker.restart().client()
    wait_for(lambda: c.query(count)[1] == [[0]], timeout=10)
    for task_id in ids:
        with pytest.raises(NotFound):
            c.status(task_id)
    assert c.stats().completed_total == 3  # totals are counters, not history rows


# ---------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A data dir on a 2 MiB tmpfs."""
    data_dir = tmp_path / "small-disk"
    data_dir.mkdir()
    mount_tmpfs(data_dir, "size=2m")
    yield data_dir
    unmount(data_dir)


@pytest.fixture
def full_disk_broker(small_disk: Path) -> Iterator[tuple[BrokerProcess, Path]]:
    """A broker on the small disk, and a filler file leaving ~300 KiB free (see `fill_up`, `make_space`)."""
    broker = BrokerProcess(small_disk, {**FAST_STORAGE, **NO_DEAD_WORKERS})
    broker.log_path = small_disk.parent / "broker.log"  # the log must not fill the small disk
    try:
        broker.start()
        broker.client().stats()
        stat = os.statvfs(small_disk)
        with open(small_disk / "filler-0", "wb") as f:
            f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - 300 * 1024, 0))
        yield broker, small_disk
    finally:
        broker.stop()


def fill_up(directory: Path) -> None:
    """Takes every byte left, so that even the broker's small probe writes fail."""
    with open(directory / "filler-1", "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def make_space(directory: Path) -> None:
    for filler in directory.glob("filler-*"):
        filler.unlink()


def fill_until_refused(client: Client, queue: str) -> tuple[dict[str, bytes], InternalError]:
    """Submits 4 KiB tasks until one is refused; returns the acknowledged ones and the refusal."""
    acked: dict[str, bytes] = {}
    for i in range(2000):
        payload = (f"{queue}-{i}-".encode() * 400)[:4096]
        try:
            acked[client.submit("disk", payload, queue=queue).task_id] = payload
        except InternalError as exc:
            return acked, exc
    raise AssertionError("2000 submits of 4 KiB fitted on a disk with 300 KiB free")


def _try_submit(client: Client, queue: str) -> str | None:
    try:
        return client.submit("disk", b"space again", queue=queue).task_id
    except InternalError:
        return None


def claim_all(client: Client, worker: str, queue: str) -> list[m.Assignment]:
    claimed: list[m.Assignment] = []
    while batch := client.claim(worker, [queue], max_tasks=10):
        claimed += batch
    return claimed


def test_a_full_disk_refuses_changes_with_internal_disk_full_keeps_answering_reads_and_accepts_writes_again(
    full_disk_broker: tuple[BrokerProcess, Path],
) -> None:
    broker, disk = full_disk_broker
    c = broker.client()
    acked, refusal = fill_until_refused(c, "full")
    assert acked, "nothing fitted before the disk was full"
    assert refusal.message.startswith("disk full: ") and str(disk) in refusal.message, refusal.message
    fill_up(disk)
    for change in (lambda: c.submit_batch([m.TaskSpec(kind="disk", queue="full")]),
                   lambda: c.submit("disk", queue="full"), lambda: c.cancel(next(iter(acked)))):
        with pytest.raises(InternalError, match="^INTERNAL: disk full: "):
            change()
    assert {c.status(t).state for t in acked} == {"pending"}  # reads go on
    assert c.stats().pending >= len(acked)

    make_space(disk)
    later = wait_for(lambda: _try_submit(c, "full"), timeout=5)  # writes resume without a restart
    broker.kill()
    c = broker.restart().client()
    assert c.status(later).state == "pending"
    claimed = claim_all(c, "disk-w", "full")
    assert {a.task_id: a.payload for a in claimed if a.task_id != later} == acked  # nothing acknowledged damaged


def test_a_change_refused_for_a_full_disk_is_not_applied(full_disk_broker: tuple[BrokerProcess, Path]) -> None:
    broker, disk = full_disk_broker
    c = broker.client()
    acked, _ = fill_until_refused(c, "refused")
    stats = c.stats()
    assert (stats.submitted_total, stats.pending) == (len(acked), len(acked)), \
        "a SUBMIT answered INTERNAL still added its task"
    make_space(disk)
    wait_for(lambda: _try_submit(c, "elsewhere"), timeout=5)
    claimed = claim_all(c, "refused-w", "refused")
    assert {a.task_id for a in claimed} == set(acked), "a worker was handed a task whose SUBMIT was refused"


def test_snapshots_resume_once_a_full_disk_has_space_again(full_disk_broker: tuple[BrokerProcess, Path]) -> None:
    broker, disk = full_disk_broker
    c = broker.client()
    fill_until_refused(c, "resume")
    fill_up(disk)
    full_since = c.stats().uptime_s
    wait_for(lambda: c.stats().uptime_s > full_since + 1.2)  # two snapshot intervals on a full disk
    make_space(disk)
    wait_for(lambda: _try_submit(c, "resume"), timeout=5)
    wait_for(lambda: len(wal_segments(broker.data_dir)) <= 2, timeout=5)  # a snapshot dropped the old segments


# ---------------------------------------------------------------- start-up faults


def test_a_second_broker_on_the_same_data_dir_exits_1_with_one_line_saying_the_database_is_locked(
    make_broker: Any,
) -> None:
    broker = make_broker()
    line = failed_start(broker.data_dir)
    assert str(broker.data_dir / DB_FILE) in line and "locked" in line, line
    assert broker.client().stats() is not None  # the first broker is unharmed


def test_a_duckdb_file_held_by_another_process_stops_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); "
                               "sys.stdin.read()", str(data_dir / DB_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        line = failed_start(data_dir)
        assert str(data_dir / DB_FILE) in line and "locked" in line and str(holder.pid) in line, line
    finally:
        holder.kill()
        holder.wait()


def test_a_data_dir_that_is_not_writable_stops_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "read-only"
    data_dir.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system instead
        mount_tmpfs(data_dir, "ro,size=1m")
    else:
        data_dir.chmod(0o555)
    try:
        line = failed_start(data_dir)
    finally:
        unmount(data_dir) if os.geteuid() == 0 else data_dir.chmod(0o755)
    assert str(data_dir) in line and "not writable" in line, line


def test_a_data_dir_that_cannot_be_created_stops_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    line = failed_start(tmp_path / "a-file" / "data")
    assert str(tmp_path / "a-file" / "data") in line and "cannot create" in line, line


def test_a_wal_directory_that_cannot_be_created_stops_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "wal").write_text("a file where the WAL directory belongs")
    line = failed_start(data_dir)
    assert str(data_dir / "wal") in line, line



def test_a_scheduled_task_handed_to_a_waiting_claim_is_still_running_after_a_sigkill(make_broker: Any) -> None:
    """The promotion and the claim it triggers reach the WAL in the order they happened."""
    broker = make_broker()
    worker, producer = broker.client(), broker.client()
    waiting = worker.send_async(Claim(id=0, worker_id="w-promoted", queues=["promoted"], max_tasks=1,
                                      wait_ms=10_000))
    task_id = producer.submit("later", b"p", queue="promoted", run_at=time.time() + 0.3).task_id
    [assignment] = waiting.get(timeout=10).tasks
    assert assignment.task_id == task_id
    broker.kill()
    broker.restart()
    info = broker.client().status(task_id)
    assert (info.state, info.worker_id, info.attempts) == ("running", "w-promoted", 1)
