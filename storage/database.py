"""One DuckDB file per data dir, written by exactly one OS thread, read by a small pool of others.

This runs in the database process (storage.db_server), never in the broker, and uses plain OS threads
(concurrent.futures) rather than gevent: callers block until their call ends, which is what the
database process, the tests and the offline `sql` command want.
Why one writer: DuckDB serialises writers anyway, and a single thread with its own connection keeps
transactions (snapshot = many statements) free of interleaving.
Why `enable_external_access=False`: the broker only touches its own file, and QUERY (ad-hoc SQL
from clients) must not read or write other files (`read_csv('/etc/passwd')`, `COPY ... TO`).

The schema lives here, versioned: `schema_version` holds the highest migration applied, and each
migration is a list of statements run in one transaction on open.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from storage.errors import QueryRefused, QueryTimeout, StorageCorrupt, StorageError, is_corruption
from storage.history_ids import KEY_SQL

log = logging.getLogger("tqbroker.storage")

__all__ = ["Database", "QueryRefused", "QueryTimeout", "StorageError", "fetch_one", "transaction"]

T = TypeVar("T")

_READ_THREADS = 2
_INTERRUPT_GRACE_SECONDS = 5.0

# Schema, one entry per version. Never edit a released entry: add the next version instead.
# task_history columns are documented in storage.history.HISTORY_COLUMNS_DOC (a test keeps them equal);
# snapshot_tasks has snapshot_id plus one column per storage.model.TaskRecord field, in field order.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE task_history (
            task_id VARCHAR, queue VARCHAR, kind VARCHAR, priority INTEGER, state VARCHAR,
            attempts INTEGER, max_retries INTEGER, worker_id VARCHAR, submitted_at TIMESTAMP,
            run_at TIMESTAMP, started_at TIMESTAMP, finished_at TIMESTAMP, duration_ms DOUBLE,
            payload_bytes INTEGER, error VARCHAR, result BLOB)""",
        """CREATE TABLE snapshots (
            snapshot_id BIGINT, format_version INTEGER, created_at DOUBLE, wal_segment BIGINT,
            submitted_total BIGINT, completed_total BIGINT, failed_total BIGINT,
            cancelled_total BIGINT, retried_total BIGINT, task_count BIGINT)""",
        """CREATE TABLE snapshot_tasks (
            snapshot_id BIGINT, task_id VARCHAR, queue VARCHAR, kind VARCHAR, payload BLOB,
            priority INTEGER, state VARCHAR, attempts INTEGER, max_retries INTEGER, lease_ms BIGINT,
            submitted_at DOUBLE, run_at DOUBLE, ready_seq BIGINT, unique_key VARCHAR,
            started_at DOUBLE, finished_at DOUBLE, worker_id VARCHAR, lease_expires_at DOUBLE,
            result BLOB, error VARCHAR)""",
    ),
    # History batches committed, by the id the broker gave them: a retried batch is written once.
    2: ("CREATE TABLE history_batches (batch_id VARCHAR PRIMARY KEY, written_at DOUBLE, row_count INTEGER)",),
    # Snapshots stored one table per slice (storage.snapshots); snapshot_tasks becomes a view over them.
    3: ("ALTER TABLE snapshot_tasks RENAME TO snapshot_tasks_v1",
        "CREATE VIEW snapshot_tasks AS SELECT * FROM snapshot_tasks_v1"),
    # Each history row's id as a growing BIGINT with its finished_at, in the same order, so a point lookup
    # reads two row groups, not the table (storage.history, storage.history_ids).
    4: ("CREATE TABLE history_keys (id_key BIGINT, finished_at TIMESTAMP)",
        f"INSERT INTO history_keys SELECT {KEY_SQL}, finished_at FROM task_history WHERE {KEY_SQL} IS NOT NULL"),
}
SCHEMA_VERSION = max(_MIGRATIONS)


def _open_error(path: Path, exc: Exception) -> StorageError:
    text = str(exc)
    if is_corruption(text):
        return _failure(path, exc)
    return StorageError(_open_error_message(path, text))


def _open_error_message(path: Path, text: str) -> str:
    if "Could not set lock" in text or "Conflicting lock" in text:  # not just "lock": "block" has it too
        pid = re.search(r"PID (\d+)", text)
        held_by = f" (PID {pid.group(1)})" if pid else ""
        return (
            f"database {path} is locked by another process{held_by} "
            "(is a broker already running on this data dir?)"
        )
    first_line = text.splitlines()[0] if text else "unknown error"
    return f"cannot open database {path}: {first_line}"


def _invalidated(exc: Exception) -> bool:
    return isinstance(exc, duckdb.FatalException) or "invalidated" in str(exc)


def _failure(path: Path, exc: Exception) -> StorageError:
    text = str(exc)
    if "No space left on device" in text:
        return StorageError(f"disk full: {path}")
    first_line = text.splitlines()[0] if text else type(exc).__name__
    if is_corruption(text):
        return StorageCorrupt(f"database {path} is damaged ({first_line}); what is stored in that block cannot be "
                              "read: restore the file from a backup")
    return StorageError(f"database {path}: {first_line}")


class _ReadJob:
    """One read on its own cursor, interruptible from the hub thread."""

    def __init__(
        self, root: duckdb.DuckDBPyConnection, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        self._root, self._fn, self._args = root, fn, args
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._cancelled = False

    def run(self) -> Any:
        cursor = self._root.cursor()
        self._cursor = cursor
        try:
            if self._cancelled:
                raise QueryTimeout("read cancelled before it started")
            return self._fn(cursor, *self._args)
        finally:
            self._cursor = None
            cursor.close()

    def cancel(self) -> None:
        """Interrupts the query; repeated by the caller because an interrupt before execute is lost."""
        self._cancelled = True
        cursor = self._cursor
        if cursor is not None:
            try:
                cursor.interrupt()
            except duckdb.Error:
                pass  # closed meanwhile: the read has ended


class Database:
    """The broker's DuckDB file: schema on open, one writer thread, two reader threads."""

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        memory_limit: str = "256MB",
        threads: int = 1,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        in_memory = str(path) == ":memory:"
        if not read_only and not in_memory:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {self.path.parent}: {exc.strerror or exc}") from None
        self._config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": memory_limit, "threads": threads, "enable_external_access": False,
        }
        try:
            self._conn = duckdb.connect(str(path), read_only=read_only, config=self._config)
        except duckdb.Error as exc:
            raise _open_error(self.path, exc) from None
        _utc(self._conn)
        self._read_root = self._conn.cursor()  # cursors for reads are made from this, never used itself
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="duckdb-writer")
        self._readers = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="duckdb-reader")
        self._closed = False
        if not read_only:
            try:
                self.run_write(_migrate, str(self.path))
            except BaseException:
                self.close()
                raise

    def run_write(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(conn, *args)` on the writer thread and waits for it.

        DuckDB errors come back as StorageError with one line (e.g. "disk full: PATH").
        """
        self._check_open()
        try:
            return self._writer.submit(lambda: fn(self._conn, *args)).result()
        except duckdb.Error as exc:
            if _invalidated(exc):
                self._reopen()
            raise _failure(self.path, exc) from exc

    def _reopen(self) -> None:
        """DuckDB invalidates a database after a fatal error (a CHECKPOINT that hit a full disk): the
        connection must be opened again before anything works, even once space has returned."""
        log.warning("reopening %s after a fatal DuckDB error", self.path)

        def reopen(_conn: duckdb.DuckDBPyConnection) -> None:
            with contextlib.suppress(duckdb.Error):
                _close_connections(self._read_root, self._conn)
            self._conn = duckdb.connect(str(self.path), read_only=self.read_only, config=self._config)
            _utc(self._conn)
            self._read_root = self._conn.cursor()

        try:
            self._writer.submit(reopen, self._conn).result()
        except duckdb.Error as exc:  # still no space: the next failing write tries again
            log.error("cannot reopen %s yet: %s", self.path, _failure(self.path, exc).message)

    def run_read(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Runs `fn(cursor, *args)` on a reader thread with a fresh cursor.

        Past `timeout` seconds the query is interrupted and QueryTimeout raised; the bound includes
        waiting for a free reader thread.
        """
        self._check_open()
        job = _ReadJob(self._read_root, fn, args)
        result = self._readers.submit(job.run)
        try:
            return result.result(timeout=timeout)
        except duckdb.Error as exc:
            raise _failure(self.path, exc) from exc
        except FutureTimeout:
            self._stop(job, result)
            raise QueryTimeout(
                f"query ran longer than {timeout:g} s and was stopped (bound: api.query_timeout_secs)"
            ) from None

    @staticmethod
    def _stop(job: _ReadJob, result: Future[Any]) -> None:
        """Interrupts until the job has ended, so the reader thread is free again (bounded wait)."""
        deadline = time.monotonic() + _INTERRUPT_GRACE_SECONDS
        while not result.done() and time.monotonic() < deadline:
            job.cancel()
            futures_wait([result], timeout=0.05)
        if not result.done():
            log.warning("a timed-out query did not stop within %.0f s", _INTERRUPT_GRACE_SECONDS)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"database {self.path} is closed")

    def close(self) -> None:
        """Finishes queued writes, closes the connection (DuckDB checkpoints on close). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.submit(_close_connections, self._read_root, self._conn).result()
        finally:
            self._writer.shutdown(wait=False)
            self._readers.shutdown(wait=False)


def _utc(conn: duckdb.DuckDBPyConnection) -> None:
    """Every connection and cursor of this database computes in UTC: task_history's TIMESTAMPs are UTC,
    so `finished_at > now() - INTERVAL 1 HOUR` is right whatever the process's TZ. (A `TimeZone` key in
    the connect config would need the icu extension autoloaded, which disabled external access forbids;
    SET GLOBAL after connecting works.)"""
    conn.execute("SET GLOBAL TimeZone = 'UTC'")


def fetch_one(
    conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None
) -> tuple[Any, ...] | None:
    """The first row, fetching the whole result: DuckDB 2.0 refuses further statements on a
    connection whose last result was not read to its end (`fetchone` leaves it open)."""
    rows = conn.execute(sql, params).fetchall() if params is not None else conn.execute(sql).fetchall()
    return rows[0] if rows else None


@contextlib.contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on any exception (a failing ROLLBACK never hides the cause)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _close_connections(*connections: duckdb.DuckDBPyConnection) -> None:
    for connection in connections:
        connection.close()


def _migrate(conn: duckdb.DuckDBPyConnection, path: str) -> None:
    """Brings the schema to SCHEMA_VERSION, one transaction per step; refuses a newer schema."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
    row = fetch_one(conn, "SELECT max(version) FROM schema_version")
    current = row[0] if row and row[0] is not None else 0
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"database {path} has schema version {current}; this broker knows up to {SCHEMA_VERSION} "
            "(run a newer broker)"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with transaction(conn):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES ($1)", [version])
        log.info("database %s: schema migrated to version %d", path, version)
