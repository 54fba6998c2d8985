"""The database process: owns the broker's DuckDB file and serves the broker over a pipe.

Why a process of its own: in the broker, DuckDB's writer thread runs Python (and DuckDB's conversion
of Python values, which holds the GIL) for every history batch, and the gevent hub thread then waits
for the GIL up to the switch interval. Measured on figure e of the benchmark (put -> claim with a
waiting worker at 1,000 tasks/s), that wait was the whole p99: 1.8-2.1 ms with history writes, 0.7 ms
without. Here the same code (storage.database, history, snapshots) runs unchanged in another
interpreter, so its GIL is not the broker's.

    python -m storage.db_server PATH [--read-only] [--memory-limit 256MB] [--threads 1] [--log-level INFO]

Requests arrive on stdin, replies leave on stdout (storage.db_wire). Each request runs on a thread of
a small pool (DuckDB's own writer and reader threads sit behind it, see storage.database), so a long
QUERY never holds up a history write. No gevent here: it would only add memory. The `close` request
closes the database; the process exits when the broker closes its stdin, and dies with the broker
(PR_SET_PDEATHSIG) if that never happens.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from storage import db_wire
from storage.database import Database
from storage.errors import StorageError
from storage.history import DEFAULT_QUERY_MAX_BYTES, TaskHistory
from storage.model import Counters, TaskRecord
from storage.snapshots import SnapshotStore

_TASKS = msgspec.msgpack.Decoder(list[TaskRecord])
_PR_SET_PDEATHSIG = 1
_TAKE_ATTACHMENT = frozenset({"snapshot_write", "snapshot_slice"})
_HANDLER_THREADS = 8  # requests in progress at once: more wait in the pool's queue


class PipeLogHandler(logging.Handler):
    """Sends log records to the broker, which writes them in its own format (text or JSON)."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send([db_wire.LOG_ID, record.levelno, record.name, record.getMessage()])
        except Exception:  # the broker is gone: nothing left to tell
            pass


class DatabaseServer:
    """Dispatches requests to TaskHistory / SnapshotStore over one open Database."""

    def __init__(self, db: Database, out: db_wire.FrameWriter) -> None:
        self.db = db
        self.history = TaskHistory(db)
        self.snapshots = SnapshotStore(db)
        self.send = out.send
        self.closing = False
        self._ops: dict[str, Callable[..., Any]] = {
            "append": lambda blob, batch_id="": self.history.append(_TASKS.decode(blob), batch_id),
            "append_dedup": lambda blob: self.history.append_dedup(_TASKS.decode(blob)),
            "get": self._get,
            "get_many": self._get_many,
            "query": self._query,
            "delete_older_than": self.history.delete_older_than,
            "checkpoint": self.history.checkpoint,
            "count": self.history.count,
            "snapshot_write": self._snapshot_write,
            "snapshot_begin": self.snapshots.begin,
            "snapshot_slice": self.snapshots.append_slice,
            "snapshot_commit": self._snapshot_commit,
            "snapshot_slices": self._snapshot_slices,
            "snapshot_slice_load": lambda snapshot_id, table: db_wire.Attached(
                None, self.snapshots.slice_blob(snapshot_id, table)),
        }

    def handle(self, request: list[Any], attachment: bytearray) -> None:
        request_id, op, args = request
        try:
            if op == "close":
                self.closing = True
                self.db.close()
                value = None
            else:
                value = self._ops[op](*args, *([attachment] if op in _TAKE_ATTACHMENT else []))
        except Exception as exc:  # every failure goes back to the caller as [kind, message]
            self.send([request_id, False, db_wire.error_value(exc)])
            return
        if isinstance(value, db_wire.Attached):
            self.send([request_id, True, value.value], value.attachment)
        else:
            self.send([request_id, True, value])

    def _get(self, task_id: str) -> bytes | None:
        task = self.history.get(task_id)
        return None if task is None else msgspec.msgpack.encode(task)

    def _get_many(self, task_ids: list[str]) -> bytes:
        return msgspec.msgpack.encode(list(self.history.get_many(task_ids).values()))

    def _query(self, sql: str, timeout: float, max_bytes: int = DEFAULT_QUERY_MAX_BYTES) -> list[Any]:
        result = self.history.query_result(sql, timeout, max_bytes)
        return [result.columns, result.rows, result.truncated]

    def _snapshot_write(self, counter_values: list[int], wal_segment: int, blob: bytearray) -> int:
        return self.snapshots.write(blob, Counters(*counter_values), wal_segment)

    def _snapshot_commit(self, snapshot_id: int, counter_values: list[int], wal_segment: int, count: int) -> int:
        return self.snapshots.commit(snapshot_id, Counters(*counter_values), wal_segment, count)

    def _snapshot_slices(self) -> list[Any] | None:
        latest = self.snapshots.latest_slices()
        if latest is None:
            return None
        snapshot_id, counters, wal_segment, task_count, tables = latest
        return [snapshot_id, list(msgspec.structs.astuple(counters)), wal_segment, task_count, tables]


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the broker dies (kill -9 included), so the DuckDB lock is
    free for the broker's next start at once. DuckDB's own WAL keeps committed writes; a history
    batch that was not committed is replayed from the broker's WAL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(args: argparse.Namespace) -> int:
    in_fd, out_fd = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print() must not corrupt the reply stream
    out = db_wire.FrameWriter(out_fd)
    logging.basicConfig(level=args.log_level, handlers=[PipeLogHandler(out.send)])
    try:
        db = Database(args.path, read_only=args.read_only, memory_limit=args.memory_limit, threads=args.threads)
    except StorageError as exc:
        out.send([db_wire.READY_ID, False, db_wire.error_value(exc)])
        return 1
    server = DatabaseServer(db, out)
    out.send([db_wire.READY_ID, True, os.getpid()])
    reader = db_wire.FrameReader(in_fd)
    with ThreadPoolExecutor(_HANDLER_THREADS, thread_name_prefix="request") as pool:
        while not server.closing and (frame := reader.read()) is not None:  # None: the broker hung up
            pool.submit(server.handle, *frame)
            del frame  # the pool holds it while it is needed; a snapshot's blob must not outlive that
    if not server.closing:
        db.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C or SIGTERM to the broker's group or cgroup:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the broker stops us (close, then EOF), or we die with it
    _die_with_parent()
    parser = argparse.ArgumentParser(description="tqbroker's database process (started by the broker)")
    parser.add_argument("path")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--memory-limit", default="256MB")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-level", default="INFO")
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
