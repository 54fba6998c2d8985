"""Snapshots of all live tasks, in the same DuckDB file as the history.

A snapshot is the live tasks and the counters, plus `wal_segment`: replay starts at that segment.
The counters are those at the WAL's rotation to that segment; each task is copied at some moment
after it (slice by slice), and replaying the segment's records `as_written` over such an image gives
the exact state (the contract is in actors/snapshot_image.py). It is written in slices (`begin`,
`append_slice` per slice, `commit`), so neither process ever holds more than one slice of it: slices
are staged in snapshot_tasks under a new snapshot_id that nothing reads until `commit` adds its
`snapshots` row and deletes the older snapshot in one transaction. At any moment exactly one complete snapshot exists.

Speed (measured here, DuckDB 2.0, 100-byte payloads, see the module tests and README):
- The caller hands over one `msgspec.msgpack.encode(list[TaskRecord])` blob (a consistent copy, made in
  one C call). Decoding that blob as `list[TaskRecord]` in one call takes ~2.3 s per million tasks and
  holds the GIL throughout, freezing every greenlet; decoding it as `list[Raw]` and then each
  element in slices takes ~1 s and lets the hub run between slices (gaps under 0.2 s).
- Rows go in through DuckDB's appender (~340k rows/s; `INSERT ... SELECT unnest(...)` managed ~60k
  rows/s for these 20 columns and held the GIL for the whole conversion).
- Loading streams rows with `fetchmany` into `TaskRecord(*row)`: a million tasks in about 2 s. The database
  process sends the broker one slice table at a time (`latest_slices`, `slice_blob`), so neither
  process holds more than one slice's bytes of the image (docs/performance.md, Snapshots).
"""

from __future__ import annotations

import re
import time

import duckdb
import msgspec

from storage.database import Database, StorageError, fetch_one, transaction
from storage.errors import StorageCorrupt
from storage.model import Counters, TaskRecord

SNAPSHOT_FORMAT_VERSION = 2  # 2: rows in per-slice tables behind the snapshot_tasks view; 1: in its table
_READABLE_FORMATS = frozenset({1, 2})
_SLICE_TABLE = "snapshot_slice_{}_{:06d}"
_SLICE_TABLES = ("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
                 "AND table_name LIKE 'snapshot_slice_%' ORDER BY table_name")
_TASK_FIELDS: tuple[str, ...] = TaskRecord.__struct_fields__
_COUNTER_FIELDS: tuple[str, ...] = Counters.__struct_fields__
_SOURCE_NAME = re.compile(r"snapshot_slice_\d+_\d{6}|snapshot_tasks_v1")
_SLICE_ROWS = 20_000  # decode+append this many tasks per step: bounds GIL hold time and buffer memory

_RAW_LIST = msgspec.msgpack.Decoder(list[msgspec.Raw])
_TASK = msgspec.msgpack.Decoder(TaskRecord)
_ENCODER = msgspec.msgpack.Encoder()

_INSERT_SNAPSHOT = (
    "INSERT INTO snapshots (snapshot_id, format_version, created_at, wal_segment, "
    f"{', '.join(_COUNTER_FIELDS)}, task_count) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_COUNTER_FIELDS) + 6))})"
)
_LATEST = (
    f"SELECT snapshot_id, format_version, wal_segment, task_count, {', '.join(_COUNTER_FIELDS)} "
    "FROM snapshots ORDER BY snapshot_id DESC LIMIT 1"
)
_LOAD_TASKS = f"SELECT {', '.join(_TASK_FIELDS)} FROM snapshot_tasks WHERE snapshot_id = $1"


class SnapshotStore:
    """Writes and loads the snapshot of live tasks."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write(self, tasks_blob: bytes | bytearray, counters: Counters, wal_segment: int) -> int:
        """Stores the tasks in `tasks_blob` (msgpack of list[TaskRecord]) as the only snapshot; returns its id.

        One slice: `begin`, `append_slice`, `commit`. The older snapshot goes only at the commit.
        """
        snapshot_id = self.begin()
        count = self.append_slice(snapshot_id, tasks_blob)
        return self.commit(snapshot_id, counters, wal_segment, count)

    def begin(self) -> int:
        """A new snapshot id to stage slices under; rows of an abandoned staging (a snapshot that failed
        half-way) are deleted. Staged rows are invisible to loading until `commit`."""
        return self._db.run_write(_begin_snapshot)

    def append_slice(self, snapshot_id: int, tasks_blob: bytes | bytearray) -> int:
        """Stages the tasks of one msgpack list[TaskRecord] slice (one transaction); returns how many."""
        return self._db.run_write(_append_slice, snapshot_id, tasks_blob)

    def commit(self, snapshot_id: int, counters: Counters, wal_segment: int, task_count: int) -> int:
        """Makes the staged snapshot the only one (one transaction), after checking it holds
        `task_count` tasks; returns its id."""
        counter_values = [getattr(counters, name) for name in _COUNTER_FIELDS]
        return self._db.run_write(_commit_snapshot, snapshot_id, counter_values, wal_segment, task_count)

    def load_latest(self) -> tuple[list[TaskRecord], Counters, int] | None:
        """(tasks, counters, wal_segment) of the newest snapshot, or None if there is none."""
        return self._db.run_read(_load_latest, str(self._db.path))

    def latest_slices(self) -> tuple[int, Counters, int, int, list[str]] | None:
        """(snapshot_id, counters, wal_segment, task_count, slice tables) of the newest snapshot, or None:
        load its tasks with `slice_blob(snapshot_id, table)` for each table, in order."""
        return self._db.run_read(_latest_slices)

    def slice_blob(self, snapshot_id: int, table: str) -> bytearray:
        """The tasks of snapshot `snapshot_id` in slice table `table` as one msgpack array: memory for one
        slice (at most ~SNAPSHOT_SLICE_BYTES of payloads as written), never the whole image."""
        return self._db.run_read(_slice_blob, snapshot_id, table)


def _slice_tables(conn: duckdb.DuckDBPyConnection) -> dict[int, list[str]]:
    """Slice tables by snapshot id, in slice order."""
    tables: dict[int, list[str]] = {}
    for (name,) in conn.execute(_SLICE_TABLES).fetchall():
        tables.setdefault(int(name.split("_")[2]), []).append(name)
    return tables


def _begin_snapshot(conn: duckdb.DuckDBPyConnection) -> int:
    """Drops slices of snapshots never committed, then creates the new snapshot's (empty) slice 0."""
    with transaction(conn):
        row = fetch_one(conn, "SELECT coalesce(max(snapshot_id), 0) FROM snapshots")
        committed = int(row[0]) if row else 0
        for snapshot_id, names in _slice_tables(conn).items():
            if snapshot_id > committed:
                for name in names:
                    conn.execute(f"DROP TABLE {name}")
        snapshot_id = committed + 1
        _create_slice(conn, snapshot_id, 0)
    return snapshot_id


def _create_slice(conn: duckdb.DuckDBPyConnection, snapshot_id: int, number: int) -> str:
    name = _SLICE_TABLE.format(snapshot_id, number)
    conn.execute(f"CREATE TABLE {name} AS SELECT * FROM snapshot_tasks_v1 WITH NO DATA")
    return name


def _append_slice(conn: duckdb.DuckDBPyConnection, snapshot_id: int, blob: bytes | bytearray) -> int:
    """A table of its own per slice: DuckDB checkpoints a table's growing row group whole, so one table
    of large payloads needed memory for all of them (a 256 MB limit failed at ~240 MiB of payloads)."""
    raws = _RAW_LIST.decode(blob)
    with transaction(conn):
        name = _create_slice(conn, snapshot_id, len(_slice_tables(conn).get(snapshot_id, [])))
        _append_tasks(conn, snapshot_id, raws, name)
    return len(raws)


def _commit_snapshot(
    conn: duckdb.DuckDBPyConnection, snapshot_id: int, counter_values: list[int], wal_segment: int, task_count: int
) -> int:
    with transaction(conn):
        tables = _slice_tables(conn)
        names = tables.get(snapshot_id, [])
        if not names:
            raise StorageError(f"snapshot {snapshot_id} was not begun (no slice tables)")
        union = " UNION ALL ".join(f"SELECT * FROM {name}" for name in names)
        row = fetch_one(conn, f"SELECT count(*) FROM ({union})")
        written = int(row[0]) if row else 0
        if written != task_count:  # a lost slice: never make it the current snapshot
            raise StorageError(f"snapshot {snapshot_id} was sent {task_count} tasks but its slices hold {written}")
        conn.execute(f"CREATE OR REPLACE VIEW snapshot_tasks AS {union}")
        conn.execute(
            _INSERT_SNAPSHOT,
            [snapshot_id, SNAPSHOT_FORMAT_VERSION, time.time(), wal_segment, *counter_values, task_count],
        )
        conn.execute("DELETE FROM snapshots WHERE snapshot_id < $1", [snapshot_id])
        conn.execute("DELETE FROM snapshot_tasks_v1")
        for other, old in tables.items():
            if other < snapshot_id:
                for name in old:
                    conn.execute(f"DROP TABLE {name}")
    return snapshot_id


def _append_tasks(conn: duckdb.DuckDBPyConnection, snapshot_id: int, raws: list[msgspec.Raw], table: str) -> None:
    """Decodes and appends in slices so the hub thread gets the GIL between them."""
    appender = conn.appender(table, columns=["snapshot_id", *_TASK_FIELDS])
    decode, astuple = _TASK.decode, msgspec.structs.astuple
    for start in range(0, len(raws), _SLICE_ROWS):
        rows = [(snapshot_id, *astuple(decode(raw))) for raw in raws[start : start + _SLICE_ROWS]]
        appender.append_rows(rows)
        appender.flush()


def _latest_head(cursor: duckdb.DuckDBPyConnection) -> tuple[int, int, int, Counters] | None:
    """(snapshot_id, wal_segment, task_count, counters) of the newest readable snapshot."""
    head = fetch_one(cursor, _LATEST)
    if head is None:
        return None
    snapshot_id, format_version, wal_segment, task_count, *counter_values = head
    if format_version not in _READABLE_FORMATS:
        raise StorageError(
            f"snapshot {snapshot_id} has format version {format_version}; this broker reads "
            f"{sorted(_READABLE_FORMATS)} (run a newer broker)"
        )
    counters = Counters(**dict(zip(_COUNTER_FIELDS, counter_values, strict=True)))
    return int(snapshot_id), int(wal_segment), int(task_count), counters


def _check_count(path: str, snapshot_id: int, expected: int, found: int) -> None:
    if found != expected:
        raise StorageCorrupt(f"database {path} is damaged: snapshot {snapshot_id} should hold {expected} tasks "
                             f"but holds {found}; restore the file from a backup")


def _load_latest(cursor: duckdb.DuckDBPyConnection, path: str) -> tuple[list[TaskRecord], Counters, int] | None:
    head = _latest_head(cursor)
    if head is None:
        return None
    snapshot_id, wal_segment, task_count, counters = head
    tasks = _fetch_tasks(cursor, snapshot_id)
    _check_count(path, snapshot_id, task_count, len(tasks))
    return tasks, counters, wal_segment


def _slice_sources(cursor: duckdb.DuckDBPyConnection, snapshot_id: int) -> list[str]:
    """The tables holding snapshot `snapshot_id`'s rows, in slice order (format 1: its one table)."""
    return _slice_tables(cursor).get(snapshot_id) or ["snapshot_tasks_v1"]


def _latest_slices(cursor: duckdb.DuckDBPyConnection) -> tuple[int, Counters, int, int, list[str]] | None:
    head = _latest_head(cursor)
    if head is None:
        return None
    snapshot_id, wal_segment, task_count, counters = head
    return snapshot_id, counters, wal_segment, task_count, _slice_sources(cursor, snapshot_id)


def _slice_blob(cursor: duckdb.DuckDBPyConnection, snapshot_id: int, table: str) -> bytearray:
    if not _SOURCE_NAME.fullmatch(table):
        raise StorageError(f"{table!r} is not a snapshot slice table")
    blob = bytearray(b"\xdd\0\0\0\0")  # array 32; its count is filled in at the end
    encode_into, count = _ENCODER.encode_into, 0
    result = cursor.execute(f"SELECT {', '.join(_TASK_FIELDS)} FROM {table} WHERE snapshot_id = $1", [snapshot_id])
    while batch := result.fetchmany(_SLICE_ROWS):
        for row in batch:
            encode_into(TaskRecord(*row), blob, -1)
        count += len(batch)
    blob[1:5] = count.to_bytes(4, "big")
    return blob


def _array_header(count: int) -> bytes:
    """The msgpack header of an array of `count` elements (fixarray, array 16 or array 32)."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _fetch_tasks(cursor: duckdb.DuckDBPyConnection, snapshot_id: int) -> list[TaskRecord]:
    """Streams rows in slices: one `fetchall` of a million rows ran 2x slower (the garbage collector
    walks every row tuple it holds) and materialises the whole result inside DuckDB's memory limit."""
    result = cursor.execute(_LOAD_TASKS, [snapshot_id])
    tasks: list[TaskRecord] = []
    while rows := result.fetchmany(_SLICE_ROWS):
        tasks += [TaskRecord(*row) for row in rows]
    return tasks
