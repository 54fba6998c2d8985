"""The broker's side of its database process (storage.db_server): the same calls as TaskHistory and
SnapshotStore, carried over a pipe.

Why: DuckDB work inside the broker made the gevent hub wait for the GIL (see storage.db_server). Here
the broker only encodes a request (one msgspec call) and writes it cooperatively; a greenlet reads the
replies and wakes each caller. If the process dies, pending calls fail with a StorageError naming its
exit status and the next call starts a new one (the history writer and the compactor retry on their
own), so a DuckDB crash costs a few retried batches, never the broker.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.os
import gevent.subprocess
import msgspec

from storage import db_wire
from storage.errors import QueryResult, StorageCorrupt, StorageError
from storage.model import Counters, TaskRecord

log = logging.getLogger("tqbroker.storage")

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0  # opening and migrating a big file takes a while; a hung start must still end
CLOSE_TIMEOUT_S = 10.0
REPLY_MARGIN_S = 30.0  # a read's own timeout runs in the process; this bounds a process that hangs
DEFAULT_QUERY_MAX_BYTES = 16 * 1024 * 1024 - 64 * 1024  # storage.history's default (no duckdb import here)
PIPE_BYTES = 1 << 20  # see _widen_pipe
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SNAPSHOT_SLICE_TASKS = 10_000  # tasks per snapshot slice sent to the database process
SNAPSHOT_SLICE_BYTES = 64 << 20  # payload bytes per snapshot slice (about): bounds both processes' memory
TASK_OVERHEAD_BYTES = 256  # a task's encoded fields besides its payload, roughly, for slicing
DECODE_SLICE = 20_000  # tasks decoded per step when loading a snapshot, between yields to the hub

_TASK = msgspec.msgpack.Decoder(TaskRecord)
_TASK_LIST = msgspec.msgpack.Decoder(list[TaskRecord])
_RAW_LIST = msgspec.msgpack.Decoder(list[msgspec.Raw])
_ENCODER = msgspec.msgpack.Encoder()


class _Channel:
    """One running database process: its pipes and the calls waiting for its replies."""

    def __init__(self, proc: Any, pid: int, reader: db_wire.FrameReader) -> None:
        self.proc, self.pid, self.reader = proc, pid, reader
        self.writer = db_wire.FrameWriter(proc.stdin.fileno(), gevent.os.nb_write, gevent.lock.Semaphore())
        self.pending: dict[int, gevent.event.AsyncResult] = {}
        self.open = True

    def hang_up(self) -> None:
        """Closing our end of the request pipe is the process's signal to finish and exit."""
        if self.open:
            self.open = False
            self.proc.stdin.close()

    def fail_pending(self, message: str) -> None:
        for waiter in self.pending.values():
            waiter.set((False, ["storage", message], b""))
        self.pending.clear()


class DatabaseProcess:
    """Starts `python -m storage.db_server` on `path` and talks to it; `.history` and `.snapshots`
    are what the broker uses."""

    def __init__(self, path: str | Path, *, read_only: bool = False, memory_limit: str = "256MB",
                 threads: int = 1) -> None:
        self.path = Path(path)
        self._command = [sys.executable, "-m", "storage.db_server", str(self.path), "--memory-limit",
                         memory_limit, "--threads", str(threads), "--log-level",
                         logging.getLevelName(log.getEffectiveLevel())]
        if read_only:
            self._command.append("--read-only")
        self._ids = itertools.count(1)
        self._channel: _Channel | None = None
        self._closed = False
        self._restarting = gevent.lock.Semaphore()
        self._channel = self._start()
        self.history = HistoryClient(self)
        self.snapshots = SnapshotClient(self)

    @property
    def pid(self) -> int:
        return self._channel.pid if self._channel is not None else 0

    # ------------------------------------------------------------------ process

    def _start(self) -> _Channel:
        """Starts the process and waits for its report: open, or why not (a locked file, say)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = gevent.subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                       start_new_session=True)  # out of the terminal's group: no Ctrl-C
        for fd in (proc.stdin.fileno(), proc.stdout.fileno()):
            gevent.os.make_nonblocking(fd)
            _widen_pipe(fd)
        reader = db_wire.FrameReader(proc.stdout.fileno(), gevent.os.nb_read)
        report = self._first_report(reader, proc)
        if not report[1]:
            self._discard(proc)
            db_wire.raise_error(report[2])
        channel = _Channel(proc, report[2], reader)
        gevent.spawn(self._read_replies, channel)
        return channel

    def _first_report(self, reader: db_wire.FrameReader, proc: Any) -> list[Any]:
        try:
            with gevent.Timeout(START_TIMEOUT_S):
                while True:
                    frame = reader.read()
                    if frame is None:
                        return [db_wire.READY_ID, False,
                                ["storage", f"database process for {self.path} exited at start "
                                            f"(status {proc.wait()}); see the log above"]]
                    body = frame[0]
                    if body[0] != db_wire.LOG_ID:
                        return body
                    _relay_log(body)
        except gevent.Timeout:
            proc.kill()
            return [db_wire.READY_ID, False,
                    ["storage", f"database process for {self.path} did not open it within {START_TIMEOUT_S:g} s"]]

    @staticmethod
    def _discard(proc: Any) -> None:
        proc.stdin.close()
        proc.stdout.close()
        try:
            proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()

    def _read_replies(self, channel: _Channel) -> None:
        while (frame := channel.reader.read()) is not None:
            self._dispatch(channel, *frame)
            del frame  # a snapshot's attachment is hundreds of MB: do not keep it until the next reply
        self._lost(channel, f"database process exited with status {channel.proc.wait()}")
        channel.proc.stdout.close()

    @staticmethod
    def _dispatch(channel: _Channel, body: list[Any], attachment: bytearray) -> None:
        if body[0] == db_wire.LOG_ID:
            _relay_log(body)
            return
        waiter = channel.pending.pop(body[0], None)
        if waiter is not None:
            waiter.set((body[1], body[2], attachment))

    def _lost(self, channel: _Channel, message: str) -> None:
        """The process is gone (or its pipe broke): fail its calls; the next call starts a new one."""
        if self._channel is channel:
            self._channel = None
            if not self._closed:
                log.error("%s (pid %d); a new one is started on the next call", message, channel.pid)
        channel.hang_up()
        channel.fail_pending(message)

    def _restart(self) -> _Channel:
        """One restart at a time: two processes on one file would fail each other on DuckDB's lock."""
        with self._restarting:
            if self._channel is None:
                log.warning("starting a new database process for %s", self.path)
                self._channel = self._start()
            return self._channel

    # ------------------------------------------------------------------ calls

    def call(self, op: str, *args: Any, attachment: bytes = b"", timeout: float | None = None) -> Any:
        """Runs `op` in the database process; raises its StorageError / QueryTimeout / QueryRefused."""
        return self.call_attached(op, *args, attachment=attachment, timeout=timeout)[0]

    def call_attached(self, op: str, *args: Any, attachment: bytes = b"",
                      timeout: float | None = None) -> tuple[Any, bytearray]:
        """`call`, also returning the reply's attachment (see storage.db_wire)."""
        if self._closed:
            raise StorageError(f"database {self.path} is closed")
        channel = self._channel or self._restart()
        request_id = next(self._ids)
        waiter = channel.pending[request_id] = gevent.event.AsyncResult()
        try:
            channel.writer.send([request_id, op, list(args)], attachment)
            ok, value, reply_attachment = waiter.get(timeout=timeout)
        except OSError as exc:  # EPIPE: it died before the reply greenlet saw the end of its output
            channel.proc.kill()
            self._lost(channel, f"database process is gone: {exc.strerror or exc}")
            raise StorageError(f"database process is gone: {exc.strerror or exc}") from None
        except gevent.Timeout:
            raise StorageError(f"database process did not answer {op} within {timeout:g} s") from None
        finally:
            channel.pending.pop(request_id, None)
        if not ok:
            db_wire.raise_error(value)
        return value, reply_attachment

    def close(self) -> None:
        """Lets the process finish its writes and close the file (DuckDB checkpoints on close)."""
        if self._closed:
            return
        channel = self._channel
        try:
            if channel is not None:
                self.call("close", timeout=CLOSE_TIMEOUT_S)
        except StorageError as exc:
            log.warning("database process did not close cleanly: %s", exc.message)
        finally:
            self._closed = True
            if channel is not None:
                channel.hang_up()
                try:
                    channel.proc.wait(timeout=CLOSE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    channel.proc.kill()


def _widen_pipe(fd: int) -> None:
    """Linux: a 1 MiB pipe instead of 64 KiB, so a 200 MB snapshot crosses in ~200 hub wake-ups, not
    ~3,000. Best effort: the size is capped by /proc/sys/fs/pipe-max-size."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass


def _relay_log(body: list[Any]) -> None:
    _, levelno, name, message = body
    logging.getLogger(name).log(levelno, "%s", message)


class HistoryClient:
    """storage.history.TaskHistory's calls, run in the database process."""

    def __init__(self, process: DatabaseProcess) -> None:
        self._process = process

    def append(self, tasks: Sequence[TaskRecord], batch_id: str = "") -> None:
        """storage.history.TaskHistory.append: a batch id already committed is not written again."""
        if tasks:
            self._process.call("append", msgspec.msgpack.encode(list(tasks)), batch_id)

    def append_dedup(self, tasks: Sequence[TaskRecord]) -> None:
        if tasks:
            self._process.call("append_dedup", msgspec.msgpack.encode(list(tasks)))

    def get(self, task_id: str, timeout: float | None = None) -> TaskRecord | None:
        """The finished task or None; StorageError when no answer came within `timeout` (default
        REPLY_MARGIN_S) or the process failed."""
        blob = self._process.call("get", task_id, timeout=timeout or REPLY_MARGIN_S)
        return None if blob is None else _TASK.decode(blob)

    def get_many(self, task_ids: Sequence[str], timeout: float | None = None) -> dict[str, TaskRecord]:
        """storage.history.TaskHistory.get_many (one scan for all ids); StorageError as `get`."""
        if not task_ids:
            return {}
        blob = self._process.call("get_many", list(task_ids), timeout=timeout or REPLY_MARGIN_S)
        return {task.task_id: task for task in _TASK_LIST.decode(blob)}

    def query(self, sql: str, timeout: float) -> tuple[list[str], list[list[Any]]]:
        result = self.query_result(sql, timeout)
        return result.columns, result.rows

    def query_result(self, sql: str, timeout: float, max_bytes: int = DEFAULT_QUERY_MAX_BYTES) -> QueryResult:
        """Rows stop before `max_bytes` of msgpack (see storage.query); `truncated` says so."""
        columns, rows, truncated = self._process.call("query", sql, timeout, max_bytes,
                                                      timeout=timeout + REPLY_MARGIN_S)
        return QueryResult(columns, rows, truncated)

    def delete_older_than(self, cutoff: float) -> int:
        return int(self._process.call("delete_older_than", cutoff))

    def checkpoint(self) -> None:
        self._process.call("checkpoint")

    def count(self) -> int:
        return int(self._process.call("count", timeout=REPLY_MARGIN_S))


class SnapshotClient:
    """storage.snapshots.SnapshotStore's calls, run in the database process."""

    def __init__(self, process: DatabaseProcess) -> None:
        self._process = process

    def write(self, tasks: Sequence[TaskRecord], counters: Counters, wal_segment: int,
              slice_bytes: int = SNAPSHOT_SLICE_BYTES) -> int:
        """Writes `tasks` as the only snapshot: `begin`, one `append`, `commit`; returns the snapshot id.
        `tasks` must not change while this runs (the queue actor hands over copies)."""
        snapshot_id = self.begin()
        self.append(snapshot_id, tasks, slice_bytes)
        return self.commit(snapshot_id, counters, wal_segment, len(tasks))

    def begin(self) -> int:
        """A new snapshot id to stage slices under (storage.snapshots `SnapshotStore.begin`)."""
        return int(self._process.call("snapshot_begin"))

    def append(self, snapshot_id: int, tasks: Sequence[TaskRecord], slice_bytes: int = SNAPSHOT_SLICE_BYTES) -> None:
        """Stages `tasks` in slices of at most SNAPSHOT_SLICE_TASKS tasks and about `slice_bytes` of payload
        (one task bigger than that is a slice of its own): neither process holds more than a slice encoded."""
        for piece in _slices(tasks, slice_bytes):
            self._process.call("snapshot_slice", snapshot_id, attachment=_ENCODER.encode(piece))
            gevent.sleep(0)

    def commit(self, snapshot_id: int, counters: Counters, wal_segment: int, task_count: int) -> int:
        """Makes the staged snapshot the only one once it holds `task_count` tasks; returns its id."""
        return int(self._process.call("snapshot_commit", snapshot_id, list(msgspec.structs.astuple(counters)),
                                      wal_segment, task_count))

    def load_latest(self) -> tuple[list[TaskRecord], Counters, int] | None:
        """(tasks, counters, wal_segment) of the newest snapshot, or None. The database process sends one
        slice table at a time and each slice's bytes are dropped once decoded: the broker holds the tasks
        and one slice, never the encoded image."""
        head = self._process.call("snapshot_slices")
        if head is None:
            return None
        snapshot_id, counter_values, wal_segment, task_count, tables = head
        tasks: list[TaskRecord] = []
        for table in tables:
            _, blob = self._process.call_attached("snapshot_slice_load", snapshot_id, table)
            try:
                tasks += decode_tasks(blob)
            except msgspec.MsgspecError as exc:  # a row DuckDB read back without complaint, but not a TaskRecord
                raise StorageCorrupt(f"database {self._process.path} is damaged: a task of the latest snapshot "
                                     f"does not decode ({exc}); restore the file from a backup") from None
            del blob
        if len(tasks) != task_count:
            raise StorageCorrupt(f"database {self._process.path} is damaged: snapshot {snapshot_id} should hold "
                                 f"{task_count} tasks but holds {len(tasks)}; restore the file from a backup")
        return tasks, Counters(*counter_values), int(wal_segment)


def _slices(tasks: Sequence[TaskRecord], slice_bytes: int) -> Iterator[Sequence[TaskRecord]]:
    start, size = 0, 0
    for end, task in enumerate(tasks):
        if end > start and (end - start >= SNAPSHOT_SLICE_TASKS or size + len(task.payload) > slice_bytes):
            yield tasks[start:end]
            start, size = end, 0
        size += len(task.payload) + TASK_OVERHEAD_BYTES
    if start < len(tasks):
        yield tasks[start:]


def decode_tasks(blob: bytes | bytearray) -> list[TaskRecord]:
    """Decodes a msgpack list of tasks in slices, letting other greenlets (/healthz) run between them:
    one call for a million tasks would hold the hub for seconds."""
    raws = _RAW_LIST.decode(blob)
    tasks: list[TaskRecord] = []
    for start in range(0, len(raws), DECODE_SLICE):
        tasks += [_TASK.decode(raw) for raw in raws[start:start + DECODE_SLICE]]
        gevent.sleep(0)
    return tasks
