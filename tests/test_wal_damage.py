"""Torn tail or damage: single corrupted bytes in WAL segments, read directly and through a real broker.

A torn tail (an unfinished write from a crash) can only be at the end of the newest segment; a bad
record with an intact record after it is damage, and the start stops naming the file and byte, unless
the broker runs with --accept-wal-damage (the damaged segments move aside, never deleted).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest
from conftest import ROOT, BrokerProcess, free_port

from storage.database import _open_error
from storage.db_process import DatabaseProcess
from storage.errors import StorageCorrupt
from storage.model import Counters, LeasesRenewed, TaskChanged, TaskFinished, TaskRecord, TaskSubmitted, WalRecord
from storage.wal import WalCorruptError, WriteAheadLog, list_segments, read_segments, segment_path, wal_directory
from storage.wal_format import HEADER_V1, RECORD_HEAD
from transport import messages as m
from transport.errors import InternalError

TASKS = 30


def make_task(i: int) -> TaskRecord:
    return TaskRecord(
        task_id=f"task-{i:06d}", queue="default", kind="email.send", payload=b"p" * (i % 50),
        priority=150, state="pending", attempts=0, max_retries=3, lease_ms=30_000,
        submitted_at=1_700_000_000.0 + i, run_at=1_700_000_000.0 + i, ready_seq=i,
    )


def write_records(wal_dir: Path, records: list[WalRecord]) -> Path:
    """Writes `records` into a new segment (one append per record) and returns its path."""
    wal = WriteAheadLog(wal_dir)
    wal.open()
    for record in records:
        wal.append([record])
    path = wal._path
    wal.close()
    return Path(path)


def record_offsets(path: Path) -> list[int]:
    """Where each record of an intact segment starts, plus the end of the file."""
    data, offsets, offset = path.read_bytes(), [], HEADER_V1.size
    while offset < len(data):
        offsets.append(offset)
        offset += RECORD_HEAD.size + RECORD_HEAD.unpack_from(data, offset)[0]
    return [*offsets, offset]


def flip(path: Path, at: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    return tmp_path / "wal"


@pytest.fixture
def records() -> list[WalRecord]:
    return [TaskSubmitted(make_task(i)) for i in range(TASKS)]


# ---------------------------------------------------------------- torn tails are still cut


@pytest.mark.parametrize("tail", [bytes(4096), struct.pack(">II", 500, 0) + b"\x82\xa4type\xa9sub",
                                  os.urandom(37) + bytes(3000)],
                         ids=["zeros", "half-a-record", "garbage-then-zeros"])
def test_a_torn_tail_with_no_intact_record_after_it_is_cut_and_every_record_before_it_survives(
    wal_dir: Path, records: list[WalRecord], tail: bytes, caplog: pytest.LogCaptureFixture,
) -> None:
    path = write_records(wal_dir, records)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING, logger="tqbroker.wal"):
        assert list(read_segments(wal_dir, 1)) == records
    assert path.stat().st_size == size
    assert "torn tail" in caplog.text and f"at byte {size} and no intact record after it" in caplog.text


def test_a_flipped_byte_in_the_last_record_is_a_torn_tail_and_the_records_before_it_survive(
    wal_dir: Path, records: list[WalRecord],
) -> None:
    path = write_records(wal_dir, records)
    offsets = record_offsets(path)
    flip(path, (offsets[-2] + offsets[-1]) // 2)
    assert list(read_segments(wal_dir, 1)) == records[:-1]
    assert path.stat().st_size == offsets[-2]


# ---------------------------------------------------------------- damage in the middle stops the read


@pytest.mark.parametrize(("where", "reason"), [
    (lambda o: o[10] + RECORD_HEAD.size + 20, "checksum mismatch"),
    (lambda o: o[10] + 4, "checksum mismatch"),  # the CRC field itself
    (lambda o: o[10], "short record"),  # the top byte of the length: far past the end of the file
    (lambda o: o[10] + 3, "checksum mismatch"),  # the low byte of the length: a few bytes off
], ids=["payload", "crc-field", "length-past-eof", "length-slightly-off"])
def test_a_flipped_byte_in_a_middle_record_of_the_newest_segment_stops_the_read_naming_file_and_byte(
    wal_dir: Path, records: list[WalRecord], where: Any, reason: str,
) -> None:
    path = write_records(wal_dir, records)
    offsets = record_offsets(path)
    at = where(offsets)
    flip(path, at, 0x01 if reason == "checksum mismatch" and at == offsets[10] + 3 else 0xFF)
    before = path.read_bytes()
    with pytest.raises(WalCorruptError) as raised:
        list(read_segments(wal_dir, 1))
    message = raised.value.message
    assert str(path) in message and f"at byte {offsets[10]}" in message, message
    assert f"{TASKS - 11} intact records follow it" in message and "--accept-wal-damage" in message, message
    assert path.read_bytes() == before, "the damaged segment was changed"


def test_a_flipped_byte_in_the_header_of_the_newest_segment_stops_the_read(
    wal_dir: Path, records: list[WalRecord],
) -> None:
    path = write_records(wal_dir, records)
    for at in (0, 10):  # the magic bytes, the segment number
        flip(path, at)
        with pytest.raises(WalCorruptError, match=r"wal-0000000001.log is damaged at byte 0"):
            list(read_segments(wal_dir, 1))
        flip(path, at)


def test_no_single_flipped_byte_silently_loses_a_record_before_the_last_one(wal_dir: Path) -> None:
    """Every byte of a small segment, flipped in turn: the read stops naming a byte at or before the
    flip, or the flip is in the last record and exactly that record is cut."""
    records: list[WalRecord] = [TaskSubmitted(make_task(i)) for i in range(3)]
    path = write_records(wal_dir, records)
    original, last_start = path.read_bytes(), record_offsets(path)[-2]
    for at in range(len(original)):
        data = bytearray(original)
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            got = list(read_segments(wal_dir, 1))
        except WalCorruptError as exc:
            assert exc.damage is not None and exc.damage.offset <= at, (at, exc.message)
            assert path.read_bytes() == bytes(data), f"flip at {at}: the damaged file was changed"
            continue
        assert at >= last_start and got == records[:-1], f"flip at {at}: read {len(got)} records"


def test_every_record_type_starts_where_the_damage_scan_looks_for_it() -> None:
    """The scan finds candidate records by the tag key right after the map header; a change in how
    records are encoded must fail here, not silently blind the scan."""
    task = make_task(1)
    for record in (TaskSubmitted(task), TaskChanged("t", "running", 1, 1.0, 1, "w", 1.0, 2.0, None),
                   LeasesRenewed(["t"], [1.0]), TaskFinished("t", "completed", 1, 1.0, "w", b"r", None)):
        assert msgspec.msgpack.encode(record)[1:6] == b"\xa4type", record


# ---------------------------------------------------------------- --accept-wal-damage


def test_accepting_damage_in_the_newest_segment_moves_it_aside_and_keeps_the_records_before_it(
    wal_dir: Path, records: list[WalRecord], caplog: pytest.LogCaptureFixture,
) -> None:
    path = write_records(wal_dir, records)
    offsets = record_offsets(path)
    flip(path, offsets[10] + 20)
    damaged = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="tqbroker.wal"):
        assert list(read_segments(wal_dir, 1, accept_damage=True)) == records[:10]
    [folder] = [p for p in wal_dir.iterdir() if p.name.startswith("damaged-")]
    assert (folder / path.name).read_bytes() == damaged, "the moved segment is not the damaged file, whole"
    assert path.read_bytes() == damaged[: offsets[10]]
    assert list(read_segments(wal_dir, 1)) == records[:10], "the records before the damage left the WAL"
    assert f"moved {path.name} to {folder}" in caplog.text and f"after byte {offsets[10]}" in caplog.text


def test_accepting_damage_in_an_older_segment_moves_it_and_every_later_segment_aside(
    wal_dir: Path, records: list[WalRecord],
) -> None:
    first = write_records(wal_dir, records[:10])
    for i in range(10, 13):
        write_records(wal_dir, [records[i]])
    flip(first, record_offsets(first)[5] + 20)
    assert list(read_segments(wal_dir, 1, accept_damage=True)) == records[:5]
    [folder] = [p for p in wal_dir.iterdir() if p.name.startswith("damaged-")]
    assert sorted(p.name for p in folder.iterdir()) == [segment_path(wal_dir, n).name for n in range(1, 5)]
    assert [n for n, _ in list_segments(wal_dir)] == [1]


def test_accepting_a_damaged_header_moves_the_segment_aside_and_a_new_wal_starts_cleanly(
    wal_dir: Path, records: list[WalRecord],
) -> None:
    write_records(wal_dir, records[:5])
    second = write_records(wal_dir, records[5:])
    flip(second, 0)
    assert list(read_segments(wal_dir, 1, accept_damage=True)) == records[:5]
    assert [n for n, _ in list_segments(wal_dir)] == [1], "nothing of the damaged segment is usable"
    write_records(wal_dir, [records[7]])  # the next start opens segment 2 again, for new changes
    assert list(read_segments(wal_dir, 1)) == [*records[:5], records[7]]


def test_a_missing_middle_segment_stops_the_read_and_accepting_it_moves_the_later_ones_aside(
    wal_dir: Path, records: list[WalRecord],
) -> None:
    for i in range(4):
        write_records(wal_dir, [records[i]])
    segment_path(wal_dir, 2).unlink()
    with pytest.raises(WalCorruptError, match="wal-0000000002.log is missing.*--accept-wal-damage"):
        list(read_segments(wal_dir, 1))
    assert list(read_segments(wal_dir, 1, accept_damage=True)) == records[:1]
    assert [n for n, _ in list_segments(wal_dir)] == [1]


# ---------------------------------------------------------------- a real broker, 3,000 SUBMITs


def broker_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update({"PYTHONPATH": str(ROOT), "TQ_PERSISTENCE__DATA_DIR": str(data_dir), "TQ_BROKER__HOST": "127.0.0.1",
                "TQ_BROKER__PORT": str(free_port()), "TQ_MONITORING__PROMETHEUS_PORT": "0", "TQ_API__REST_PORT": "0"})
    return env


def failed_start(data_dir: Path) -> str:
    """Runs the broker, expects exit status 1, and returns its one plain (non-JSON-log) stderr line."""
    result = subprocess.run([sys.executable, "-m", "actors"], cwd=ROOT, env=broker_env(data_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)
    plain = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(plain) == 1, result.stderr
    return plain[0]


@pytest.fixture(scope="module")
def pristine_wal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir left by a broker killed with -9 after 3,000 acknowledged SUBMITs, all in one segment."""
    data_dir = tmp_path_factory.mktemp("pristine") / "data"
    broker = BrokerProcess(data_dir, {"TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "3600"}).start()
    try:
        client = broker.client()
        for batch in range(30):
            client.submit_batch([m.TaskSpec(kind="flip", payload=bytes([batch]) * 200, queue="flip")
                                 for _ in range(100)])
        broker.kill()
    finally:
        broker.stop()
    yield data_dir


@pytest.fixture
def full_wal(pristine_wal: Path, tmp_path: Path) -> Iterator[tuple[BrokerProcess, Path, list[int]]]:
    """A copy of `pristine_wal` and a (stopped) broker for it; (broker, the segment, where each record
    starts plus the end)."""
    data_dir = tmp_path / "data"
    shutil.copytree(pristine_wal, data_dir)
    broker = BrokerProcess(data_dir, {"TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "3600"})
    [(_, path)] = list_segments(wal_directory(data_dir))
    offsets = record_offsets(path)
    assert len(offsets) == 3001, len(offsets)
    yield broker, path, offsets
    broker.stop()


def test_a_flipped_byte_at_10_50_and_90_percent_of_the_newest_segment_stops_the_start_naming_file_and_byte(
    full_wal: tuple[BrokerProcess, Path, list[int]],
) -> None:
    broker, path, offsets = full_wal
    original = path.read_bytes()
    for share in (0.1, 0.5, 0.9):
        at = int(len(original) * share)
        record = max(i for i, start in enumerate(offsets) if start <= at)
        flip(path, at)
        line = failed_start(broker.data_dir)
        assert str(path) in line and f"at byte {offsets[record]}" in line and "--accept-wal-damage" in line, line
        assert f"{3000 - record - 1} intact records follow it" in line, line
        assert path.read_bytes() != original and len(path.read_bytes()) == len(original), "the segment was cut"
        flip(path, at)


def test_the_broker_started_with_accept_wal_damage_keeps_the_records_before_it_across_restarts(
    full_wal: tuple[BrokerProcess, Path, list[int]],
) -> None:
    broker, path, offsets = full_wal
    flip(path, offsets[1500] + 30)
    broker.start(["--accept-wal-damage"])
    assert broker.client(timeout=30.0).stats().pending == 1500
    assert "accepting WAL damage" in broker.log() and f"after byte {offsets[1500]}" in broker.log()
    assert [p.name for p in (path.parent).glob("damaged-*/*")] == [path.name]
    broker.restart()  # without the flag: the intact records before the damage are still in the WAL
    assert broker.client(timeout=30.0).stats().pending == 1500


def test_a_flipped_byte_in_the_last_record_is_cut_as_a_torn_tail_and_the_2999_before_it_survive(
    full_wal: tuple[BrokerProcess, Path, list[int]],
) -> None:
    broker, path, offsets = full_wal
    flip(path, offsets[-2] + 30)
    broker.start()
    assert broker.client(timeout=30.0).stats().pending == 2999
    assert "torn tail" in broker.log()


# ---------------------------------------------------------------- a damaged DuckDB file


def unique_bytes(tag: str, i: int, size: int) -> bytes:
    """Incompressible bytes that occur once in the database file, to find the block that holds them."""
    return random.Random(f"{tag}{i}").randbytes(size)


def stored_task(i: int, state: str, tag: str) -> TaskRecord:
    return TaskRecord(task_id=f"{tag}-{i:06d}", queue="q", kind="k", payload=unique_bytes(tag, i, 100), priority=1,
                      state=state, attempts=1, max_retries=3, lease_ms=1000, submitted_at=1.7e9 + i, run_at=1.7e9 + i,
                      ready_seq=i, finished_at=1.7e9 + i + 1 if state == "completed" else None,
                      result=unique_bytes(tag, i, 100) if state == "completed" else None)


@pytest.fixture
def damaged_db(tmp_path: Path) -> Iterator[Any]:
    """`damage(tag)` flips a byte inside what task `tag`-000500 stored (history result or snapshot
    payload) in a DuckDB file with 2,000 finished tasks and a snapshot of 2,000 live ones, and returns
    a DatabaseProcess (the broker's own) open on it. (A damaged snapshot is tested through a broker.)"""
    path = tmp_path / "tqbroker.duckdb"
    db = DatabaseProcess(path)
    db.history.append([stored_task(i, "completed", "done") for i in range(2000)])
    db.snapshots.write([stored_task(i, "pending", "live") for i in range(2000)], Counters(), 1)
    db.history.checkpoint()
    db.close()
    opened: list[DatabaseProcess] = []

    def damage(tag: str) -> DatabaseProcess:
        data = bytearray(path.read_bytes())
        at = data.find(unique_bytes(tag, 500, 100))
        assert at > 0, "the stored bytes are not in the file as written (compressed?)"
        data[at + 50] ^= 0xFF
        path.write_bytes(bytes(data))
        opened.append(DatabaseProcess(path))
        return opened[-1]

    yield damage
    for db in opened:
        db.close()


def test_a_damaged_history_block_answers_lookups_and_queries_naming_the_database_file(
    damaged_db: Any, tmp_path: Path,
) -> None:
    db = damaged_db("done")
    for call in (lambda: db.history.get("done-000500"),
                 lambda: db.history.query("SELECT sum(octet_length(result)) FROM task_history", 10.0)):
        with pytest.raises(StorageCorrupt) as raised:
            call()
        assert str(tmp_path / "tqbroker.duckdb") in raised.value.message, raised.value.message
        assert "cannot read task history" in raised.value.message and "is damaged" in raised.value.message
        assert raised.value.code == "INTERNAL"


def test_opening_a_file_with_a_damaged_block_says_damaged_not_locked(tmp_path: Path) -> None:
    """DuckDB's checksum error mentions a "block"; it once read as a lock held by another broker."""
    error = _open_error(tmp_path / "x.duckdb", duckdb.Error(
        "Corrupt database file: computed checksum 1 does not match stored checksum 2 in block at location 4096"))
    assert isinstance(error, StorageCorrupt) and "is damaged" in error.message and "locked" not in error.message


def test_a_broker_on_a_damaged_duckdb_file_names_it_in_query_errors_and_refuses_a_damaged_snapshot(
    make_broker: Any,
) -> None:
    broker = make_broker(**{"TQ_WORKER__HEARTBEAT_INTERVAL_SECS": "3600"})
    client = broker.client()
    client.submit_batch([m.TaskSpec(kind="db", payload=unique_bytes("live", i, 200), queue="db") for i in range(300)])
    claimed = [a for _ in range(5) for a in client.claim("w", ["db"], max_tasks=10)]
    for i, assignment in enumerate(claimed):
        client.complete("w", assignment.task_id, unique_bytes("done", i, 200))
    assert broker.terminate() == 0  # a graceful stop: the snapshot and history are in the DuckDB file
    db_file = broker.data_dir / "tqbroker.duckdb"

    flip_inside(db_file, unique_bytes("done", 25, 200))
    client = broker.start().client(timeout=30.0)
    with pytest.raises(InternalError) as raised:
        client.query("SELECT sum(octet_length(result)) FROM task_history")
    message = raised.value.message
    assert str(db_file) in message and "cannot read task history" in message, message
    assert broker.terminate() == 0

    flip_inside(db_file, unique_bytes("live", 250, 200))
    line = failed_start(broker.data_dir)
    assert str(db_file) in line and "latest snapshot" in line and "restore the file from a backup" in line, line


def flip_inside(path: Path, stored: bytes) -> None:
    """Flips a byte in every copy of `stored` in the file (a freed block may still hold an old copy)."""
    data = bytearray(path.read_bytes())
    copies, at = [], data.find(stored)
    while at >= 0:
        copies, at = [*copies, at], data.find(stored, at + 1)
    assert copies, "the stored bytes are not in the file as written (compressed?)"
    for at in copies:
        data[at + len(stored) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
