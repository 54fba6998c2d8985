"""The write-ahead log against real files: round trips, rotation, torn tails, damage, disk full, fsync."""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gevent.event
import pytest

from storage.model import LeasesRenewed, TaskChanged, TaskFinished, TaskRecord, TaskSubmitted, WalRecord
from storage.wal import (
    FREE_CACHE_FLOOR,
    FREE_CACHE_S,
    MAGIC,
    WalCorruptError,
    WalError,
    WriteAheadLog,
    list_segments,
    read_segments,
    segment_path,
)

WAIT = 5.0  # upper bound for waiting on an event; the waits end as soon as it is set
ROOT = Path(__file__).resolve().parent.parent


def make_task(i: int) -> TaskRecord:
    return TaskRecord(
        task_id=f"task-{i:06d}", queue="default", kind="email.send", payload=b"p" * (i % 50),
        priority=150, state="pending", attempts=0, max_retries=3, lease_ms=30_000,
        submitted_at=1_700_000_000.0 + i, run_at=1_700_000_000.0 + i, ready_seq=i,
    )


def every_record_type() -> list[WalRecord]:
    full = TaskRecord(
        task_id="t-full", queue="q", kind="k", payload=b"\x00\xff", priority=255, state="running",
        attempts=2, max_retries=5, lease_ms=1000, submitted_at=1.5, run_at=2.5, ready_seq=7,
        unique_key="u", started_at=3.5, finished_at=None, worker_id="w", lease_expires_at=4.5,
        result=b"r", error="boom",
    )
    return [
        TaskSubmitted(make_task(1)),
        TaskSubmitted(full),
        TaskChanged("task-000001", "running", 1, 10.0, 3, "w1", 11.0, 41.0, None),
        TaskChanged("task-000001", "scheduled", 1, 12.0, 4, None, None, None, "err", retried=True),
        LeasesRenewed(["task-000001", "t-full"], [50.0, 51.0]),
        TaskFinished("t-full", "completed", 2, 60.0, "w", b"result", None),
    ]


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    return tmp_path / "wal"


@pytest.fixture
def wal(wal_dir: Path) -> Iterator[WriteAheadLog]:
    log = WriteAheadLog(wal_dir)
    log.open()
    yield log
    log.close()


def write_records(wal_dir: Path, records: list[WalRecord], **kwargs: object) -> None:
    log = WriteAheadLog(wal_dir, **kwargs)  # type: ignore[arg-type]
    log.open()
    log.append(records)
    log.close()


def test_every_record_type_reads_back_as_written(wal: WriteAheadLog, wal_dir: Path) -> None:
    records = every_record_type()
    wal.append(records[:2])
    wal.append(records[2:])
    assert list(read_segments(wal_dir, 1)) == records


def test_a_segment_starts_with_magic_version_and_its_number(wal: WriteAheadLog, wal_dir: Path) -> None:
    header = segment_path(wal_dir, 1).read_bytes()[:15]
    assert header == MAGIC + struct.pack(">HQ", 1, 1)


def test_appends_past_the_segment_size_rotate_and_read_back_in_order(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, segment_bytes=4096)
    log.open()
    records: list[WalRecord] = [TaskSubmitted(make_task(i)) for i in range(600)]
    for start in range(0, len(records), 7):
        log.append(records[start : start + 7])
    log.close()
    assert len(list_segments(wal_dir)) > 5
    assert list(read_segments(wal_dir, 1)) == records


def test_opening_again_starts_a_new_segment_instead_of_appending(wal_dir: Path) -> None:
    write_records(wal_dir, [TaskSubmitted(make_task(1))])
    log = WriteAheadLog(wal_dir)
    log.open()
    assert log.current_segment == 2
    log.append([TaskSubmitted(make_task(2))])
    log.close()
    assert [r.task.task_id for r in read_segments(wal_dir, 1)] == ["task-000001", "task-000002"]


def test_opening_at_an_existing_segment_number_is_refused(wal_dir: Path) -> None:
    write_records(wal_dir, [TaskSubmitted(make_task(1))])
    with pytest.raises(WalError, match="never appended to"):
        WriteAheadLog(wal_dir).open(start_segment=1)


def test_a_record_cut_short_at_the_tail_is_cut_and_reading_goes_on_after_reopen(
    wal_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records: list[WalRecord] = [TaskSubmitted(make_task(i)) for i in range(10)]
    write_records(wal_dir, records)
    path = segment_path(wal_dir, 1)
    full_size = path.stat().st_size
    os.truncate(path, full_size - 5)
    with caplog.at_level(logging.WARNING, logger="tqbroker.wal"):
        assert list(read_segments(wal_dir, 1)) == records[:9]
    assert str(path) in caplog.text and "short record" in caplog.text
    good_end = path.stat().st_size
    assert f"at byte {good_end}" in caplog.text
    write_records(wal_dir, [TaskSubmitted(make_task(99))])
    assert list(read_segments(wal_dir, 1)) == [*records[:9], TaskSubmitted(make_task(99))]


def test_a_flipped_byte_in_the_last_record_fails_its_checksum_and_is_cut(
    wal_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records: list[WalRecord] = [TaskSubmitted(make_task(i)) for i in range(5)]
    write_records(wal_dir, records)
    path = segment_path(wal_dir, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tqbroker.wal"):
        assert list(read_segments(wal_dir, 1)) == records[:4]
    assert "checksum mismatch" in caplog.text
    assert list(read_segments(wal_dir, 1)) == records[:4]  # repaired: a second read finds nothing to cut


def test_a_crash_right_after_creating_a_segment_leaves_a_header_that_is_repaired(wal_dir: Path) -> None:
    write_records(wal_dir, [TaskSubmitted(make_task(1))])
    segment_path(wal_dir, 2).write_bytes(MAGIC[:3])
    assert len(list(read_segments(wal_dir, 1))) == 1
    write_records(wal_dir, [TaskSubmitted(make_task(2))])  # segment 2 is now in the middle, and valid
    assert len(list(read_segments(wal_dir, 1))) == 2


def test_damage_in_a_segment_that_is_not_the_last_raises_naming_the_file(wal_dir: Path) -> None:
    write_records(wal_dir, [TaskSubmitted(make_task(i)) for i in range(5)])
    write_records(wal_dir, [TaskSubmitted(make_task(9))])
    first = segment_path(wal_dir, 1)
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError) as raised:
        list(read_segments(wal_dir, 1))
    assert str(first) in raised.value.message
    assert "at byte 15" in raised.value.message and "--accept-wal-damage" in raised.value.message


def test_a_missing_segment_in_the_middle_raises(wal_dir: Path) -> None:
    for i in range(3):
        write_records(wal_dir, [TaskSubmitted(make_task(i))])
    segment_path(wal_dir, 2).unlink()
    with pytest.raises(WalCorruptError, match="wal-0000000002.log is missing"):
        list(read_segments(wal_dir, 1))


def test_reading_from_a_later_segment_skips_older_files(wal_dir: Path) -> None:
    for i in range(3):
        write_records(wal_dir, [TaskSubmitted(make_task(i))])
    assert [r.task.task_id for r in read_segments(wal_dir, 2)] == ["task-000001", "task-000002"]


def test_a_segment_with_an_unknown_version_raises_naming_the_version(wal_dir: Path) -> None:
    write_records(wal_dir, [TaskSubmitted(make_task(1))])
    path = segment_path(wal_dir, 1)
    data = bytearray(path.read_bytes())
    data[5:7] = struct.pack(">H", 7)
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match="format version 7"):
        list(read_segments(wal_dir, 1))


def test_a_full_disk_leaves_nothing_torn_and_probe_finds_it_writable_again(
    wal: WriteAheadLog, wal_dir: Path
) -> None:
    before: list[WalRecord] = [TaskSubmitted(make_task(i)) for i in range(3)]
    wal.append(before)
    path = segment_path(wal_dir, wal.current_segment)
    size = path.stat().st_size

    def half_then_full(fd: int, data: bytes | bytearray | memoryview) -> int:
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    wal._write = half_then_full
    with pytest.raises(WalError) as raised:
        wal.append([TaskSubmitted(make_task(i)) for i in range(10, 20)])
    assert raised.value.message == f"disk full: {path}"
    assert path.stat().st_size == size
    assert wal.healthy is False
    with pytest.raises(WalError, match="disk full"):
        wal.append([TaskSubmitted(make_task(30))])
    assert wal.probe() is False
    assert path.stat().st_size == size
    wal._write = os.write
    assert wal.probe() is True and wal.healthy is True
    after = TaskSubmitted(make_task(40))
    wal.append([after])
    assert list(read_segments(wal_dir, 1)) == [*before, after]


class FakeDisk:
    """Stands in for `os.statvfs` and the WAL's clock: counts the statvfs calls, answers `free` bytes."""

    def __init__(self, free: int) -> None:
        self.free, self.calls, self.now = free, 0, 1000.0

    def statvfs(self, path: object) -> os.statvfs_result:
        self.calls += 1
        return os.statvfs_result((4096, 1, self.free, self.free, self.free, 0, 0, 0, 0, 255))


@pytest.fixture
def fake_disk(monkeypatch: pytest.MonkeyPatch) -> FakeDisk:
    import storage.wal as wal_module

    disk = FakeDisk(free=1 << 40)
    monkeypatch.setattr(os, "statvfs", disk.statvfs)
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: disk.now), "perf_counter": time.perf_counter})
    monkeypatch.setattr(wal_module, "time", clock)
    return disk


def test_free_bytes_reuses_one_statvfs_for_a_short_time_minus_what_the_wal_wrote(
    wal: WriteAheadLog, fake_disk: FakeDisk
) -> None:
    assert wal.free_bytes() == 1 << 40
    path = segment_path(wal.directory, wal.current_segment)
    size = path.stat().st_size
    wal.append([TaskSubmitted(make_task(i)) for i in range(20)])
    written = path.stat().st_size - size
    assert wal.free_bytes() == (1 << 40) - written
    assert fake_disk.calls == 1
    fake_disk.now += 2 * FREE_CACHE_S
    fake_disk.free = 1 << 39
    assert wal.free_bytes() == 1 << 39
    assert fake_disk.calls == 2


def test_free_bytes_asks_the_filesystem_every_time_when_the_disk_is_nearly_full(
    wal: WriteAheadLog, fake_disk: FakeDisk
) -> None:
    fake_disk.free = FREE_CACHE_FLOOR - 1
    assert wal.free_bytes() == FREE_CACHE_FLOOR - 1
    fake_disk.free = 1000
    assert wal.free_bytes() == 1000  # someone else took the space: seen at once, not after the cache time
    assert fake_disk.calls == 2


def test_interval_mode_calls_back_at_once_and_fsyncs_in_the_background(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, fsync="interval", sync_interval_ms=10)
    synced = gevent.event.Event()
    log.on_fsync = lambda seconds: synced.set()
    log.open()
    called: list[bool] = []
    log.append([TaskSubmitted(make_task(1))])
    log.after_durable(lambda: called.append(True))
    assert called == [True]
    assert synced.wait(WAIT)
    assert log.last_fsync_seconds >= 0
    log.close()


def test_always_mode_calls_back_only_after_one_fsync_for_the_whole_group(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, fsync="always")
    fsync_calls: list[int] = []
    rounds: list[float] = []
    log._fsync = lambda fd: fsync_calls.append(fd)
    log.on_fsync = rounds.append
    log.open()
    done = gevent.event.Event()
    seen: list[int] = []
    log.append([TaskSubmitted(make_task(1))])
    for _ in range(3):
        log.after_durable(lambda: seen.append(len(rounds)))
    log.after_durable(done.set)
    assert seen == []
    assert done.wait(WAIT)
    assert seen == [1, 1, 1]
    assert len(rounds) == 1 and fsync_calls
    log.close()


def test_always_mode_callbacks_queued_during_an_fsync_wait_for_the_next_one(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, fsync="always")
    in_fsync = gevent.event.Event()
    release = threading.Event()
    rounds: list[float] = []

    def slow_fsync(fd: int) -> None:
        in_fsync.set()
        release.wait(WAIT)

    log._fsync = slow_fsync
    log.on_fsync = rounds.append
    log.open()
    first, second = gevent.event.AsyncResult(), gevent.event.AsyncResult()
    log.append([TaskSubmitted(make_task(1))])
    log.after_durable(lambda: first.set(len(rounds)))
    assert in_fsync.wait(WAIT)
    log.append([TaskSubmitted(make_task(2))])
    log.after_durable(lambda: second.set(len(rounds)))
    release.set()
    assert first.get(timeout=WAIT) == 1
    assert second.get(timeout=WAIT) == 2
    log.close()


def test_a_failed_fsync_reports_the_error_instead_of_acknowledging(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, fsync="always")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    log._fsync = failing_fsync
    log.open()
    log.append([TaskSubmitted(make_task(1))])
    outcome = gevent.event.AsyncResult()
    log.after_durable(lambda: outcome.set("acknowledged"), lambda error: outcome.set(error.message))
    assert "Input/output error" in outcome.get(timeout=WAIT)
    assert log.healthy is False
    log._fsync = os.fsync
    log.close()


def test_rotate_returns_the_new_segment_and_older_ones_can_be_deleted(
    wal: WriteAheadLog, wal_dir: Path
) -> None:
    wal.append([TaskSubmitted(make_task(1))])
    assert wal.rotate() == 2
    wal.append([TaskSubmitted(make_task(2))])
    assert wal.rotate() == 3
    assert wal.total_bytes() == sum(p.stat().st_size for _, p in list_segments(wal_dir))
    assert wal.delete_segments_before(3) == 2
    assert [n for n, _ in list_segments(wal_dir)] == [3]
    wal.append([TaskSubmitted(make_task(3))])
    assert [r.task.task_id for r in read_segments(wal_dir, 3)] == ["task-000003"]


def test_close_is_idempotent_and_a_closed_log_refuses_appends(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir)
    log.open()
    log.close()
    log.close()
    with pytest.raises(WalError, match="not open"):
        log.append([TaskSubmitted(make_task(1))])


WRITER_SCRIPT = """
import sys
from storage.model import TaskRecord, TaskSubmitted
from storage.wal import WriteAheadLog
wal = WriteAheadLog(sys.argv[1], segment_bytes=64 * 1024)
wal.open()
n = 0
while True:
    batch = [TaskSubmitted(TaskRecord(task_id=str(n + i), queue="q", kind="k", payload=b"x" * 300, priority=1,
                                      state="pending", attempts=0, max_retries=0, lease_ms=1000, submitted_at=0.0,
                                      run_at=0.0)) for i in range(50)]
    wal.append(batch)
    n += len(batch)
    print(n, flush=True)
"""


def test_a_process_killed_mid_stream_loses_no_acknowledged_record(wal_dir: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(wal_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = 0
    for line in child.stdout:
        acknowledged = int(line)
        if acknowledged >= 20_000:
            break
    child.kill()
    child.wait(timeout=WAIT)
    ids = [int(record.task.task_id) for record in read_segments(wal_dir, 1)]
    assert ids == list(range(len(ids)))
    assert len(ids) >= acknowledged
    assert len(list_segments(wal_dir)) > 10
