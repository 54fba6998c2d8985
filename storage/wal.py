"""The write-ahead log: every state change is appended here before the broker acknowledges it.

The on-disk layout (segments, header, `length | crc32 | msgpack` records) is in `storage.wal_format`;
replaying it at start-up is `storage.wal_reader.read_segments`, re-exported here. This module is the
appending side.

Why segments: a snapshot covers everything below some segment number, so retention is "delete the
files below it" instead of rewriting a file. A segment is never appended to after the process that
created it has moved on, so a tail the reader repairs (truncates) stays the end of its file.

The appending side runs in the queue actor's greenlet: `append` is a plain `os.write` (fast, no
fsync); fsync runs in a real OS thread (gevent's ThreadPool) from a syncer greenlet, so the hub never
waits on the disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import gevent
import gevent.event
import gevent.threadpool
import msgspec

from storage.model import WalRecord
from storage.wal_format import (
    FORMAT_VERSION,
    HEADER_V1,
    MAGIC,
    RECORD_HEAD,
    WAL_DIRNAME,
    WalCorruptError,
    WalError,
    list_segments,
    segment_path,
    wal_directory,
)
from storage.wal_reader import read_segments

__all__ = [
    "DEFAULT_SEGMENT_BYTES", "FORMAT_VERSION", "MAGIC", "WAL_DIRNAME", "FsyncMode", "WalCorruptError", "WalError",
    "WriteAheadLog", "list_segments", "read_segments", "segment_path", "wal_directory",
]

log = logging.getLogger("tqbroker.wal")

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024

FREE_CACHE_S = 0.02  # how long a statvfs result answers free_bytes()
FREE_CACHE_FLOOR = 64 * 1024 * 1024  # below this much free space, free_bytes() always asks the filesystem
FAIL_FSYNC_FLAG = "FAIL_FSYNC"  # see _injectable_fsync

_RECORD_PLACEHOLDER = bytes(RECORD_HEAD.size)
_PROBE_BLOCK = bytes(4096)

FsyncMode = Literal["interval", "always"]
R = TypeVar("R")
ErrorCallback = Callable[[WalError], None]


def _fsync_error_message(path: Path | str, exc: OSError) -> str:
    return (f"fsync of the WAL failed at {path}: {exc.strerror or exc}; changes since the last good fsync may "
            "not be durable and the page cache can no longer be trusted: restart the broker (it replays the WAL)")


def _injectable_fsync(directory: Path) -> Callable[[int], None]:
    """Test hook (TQ_TEST_HOOKS=1 at start): fsync fails with EIO while the file `FAIL_FSYNC_FLAG` exists
    in the WAL directory, as a dying disk or a lost NFS write would make it fail."""
    flag = directory / FAIL_FSYNC_FLAG

    def fsync(fd: int) -> None:
        if flag.exists():
            raise OSError(errno.EIO, "Input/output error (injected by the test hook)")
        os.fsync(fd)

    return fsync


def _os_error_message(path: Path | str, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {path}"
    return f"cannot write WAL at {path}: {exc.strerror or exc}"


class WriteAheadLog:
    """The appending side of the WAL. Used by one greenlet (the queue actor); not thread-safe."""

    def __init__(
        self,
        directory: str | Path,
        *,
        fsync: FsyncMode = "interval",
        sync_interval_ms: int = 100,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if fsync not in ("interval", "always"):
            raise ValueError(f"fsync must be 'interval' or 'always', not {fsync!r}")
        self.directory = Path(directory)
        self.fsync_mode: FsyncMode = fsync
        self.sync_interval = max(sync_interval_ms, 1) / 1000
        self.segment_bytes = segment_bytes
        self.healthy = True
        self.last_error: WalError | None = None
        self.fsync_error: WalError | None = None  # set by a failed fsync, never cleared: see _sync_round
        self.last_fsync_seconds = 0.0
        self.on_fsync: Callable[[float], None] | None = None
        self.current_segment = 0
        # Seams for fault-injection tests: replace with functions raising OSError.
        self._write: Callable[[int, bytes | bytearray | memoryview], int] = os.write
        self._fsync: Callable[[int], None] = os.fsync
        if os.environ.get("TQ_TEST_HOOKS") == "1":
            self._fsync = _injectable_fsync(self.directory)
        self._fd = -1
        self._path = self.directory
        self._size = 0
        self._torn = False  # a failed write could not be truncated away: never append to that file again
        self._dirty = False
        self._dir_dirty = False
        self._retired: list[tuple[int, Path]] = []  # rotated-away segments: fsynced, closed by the syncer
        self._waiting: list[tuple[Callable[[], None], ErrorCallback | None]] = []
        self._wake = gevent.event.Event()
        self._stopping = False
        self._open = False
        self._pool: gevent.threadpool.ThreadPool | None = None
        self._syncer: gevent.Greenlet | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray()
        self._appended = self._free = self._free_appended = 0  # free_bytes' cache: bytes written, free then
        self._free_at = float("-inf")

    # ------------------------------------------------------------------ lifecycle

    def open(self, start_segment: int | None = None) -> None:
        """Starts a NEW segment (max existing + 1, or `start_segment`) and the syncer greenlet."""
        if self._open:
            raise WalError(f"WAL at {self.directory} is already open")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WalError(f"cannot create WAL directory {self.directory}: {exc.strerror or exc}") from exc
        existing = list_segments(self.directory)
        last = existing[-1][0] if existing else 0
        number = last + 1 if start_segment is None else start_segment
        if number <= last:
            raise WalError(
                f"cannot start WAL segment {number} in {self.directory}: segment {last} exists "
                "and old segments are never appended to"
            )
        self._open_segment(number)
        self._pool = gevent.threadpool.ThreadPool(1)
        self._wake.clear()
        self._stopping = False
        self._open = True
        self.healthy, self.last_error = True, None
        loop = self._always_loop if self.fsync_mode == "always" else self._interval_loop
        self._syncer = gevent.spawn(loop)

    def close(self) -> None:
        """Stops the syncer, fsyncs and closes every segment. Idempotent."""
        if not self._open:
            return
        self._stopping = True
        self._wake.set()
        if self._syncer is not None:
            self._syncer.join()
        self._retired.append((self._fd, self._path))
        self._dirty = False
        self._sync_round()
        self._fd = -1
        self._open = False
        if self._pool is not None:
            self._pool.kill()
            self._pool = None

    def _open_segment(self, number: int) -> None:
        """Creates segment `number` with its header and makes it current; the old fd is retired."""
        path = segment_path(self.directory, number)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise self._mark_failed(WalError(_os_error_message(path, exc))) from exc
        try:
            self._write_all(fd, HEADER_V1.pack(MAGIC, FORMAT_VERSION, number))
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise self._mark_failed(WalError(_os_error_message(path, exc))) from exc
        if self._fd >= 0:
            self._retired.append((self._fd, self._path))
        self._fd, self._path, self._size = fd, path, HEADER_V1.size
        self.current_segment = number
        self._torn = False
        self._dirty = self._dir_dirty = True

    # ------------------------------------------------------------------ appending

    def append(self, records: list[WalRecord]) -> None:
        """Writes `records` to the OS with one write; on failure nothing of them stays in the file."""
        if not self.healthy:
            raise self.last_error or WalError(f"cannot write WAL at {self._path}")
        if not self._open:
            raise WalError(f"WAL at {self.directory} is not open")
        if self._size >= self.segment_bytes:
            self._open_segment(self.current_segment + 1)
        buffer = self._buffer
        buffer.clear()
        encode_into, pack_into, crc32 = self._encoder.encode_into, RECORD_HEAD.pack_into, zlib.crc32
        for record in records:
            start = len(buffer)
            buffer += _RECORD_PLACEHOLDER
            encode_into(record, buffer, -1)
            body = start + RECORD_HEAD.size
            pack_into(buffer, start, len(buffer) - body, crc32(memoryview(buffer)[body:]))
        before = self._size
        try:
            self._write_all(self._fd, buffer)
        except OSError as exc:
            self._undo_write(before)
            raise self._mark_failed(WalError(_os_error_message(self._path, exc))) from exc
        self._size = before + len(buffer)
        self._appended += len(buffer)
        self._dirty = True

    def _write_all(self, fd: int, data: bytes | bytearray) -> None:
        """One `os.write`, plus more only if the kernel took less (short writes are legal)."""
        written = self._write(fd, data)
        if written == len(data):
            return
        view = memoryview(data)
        while written < len(view):
            written += self._write(fd, view[written:])

    def _undo_write(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            log.exception("cannot cut the failed write out of %s; the next segment will be used", self._path)
            self._torn = True

    def _mark_failed(self, error: WalError) -> WalError:
        self.healthy = False
        self.last_error = error
        log.error("WAL write failed: %s", error.message)
        return error

    def probe(self) -> bool:
        """Checks whether the disk takes writes again (test block written, fsynced, cut away)."""
        if not self._open or self.fsync_error is not None:
            return False
        if self.healthy:
            return True
        try:
            if self._torn or self._size >= self.segment_bytes:
                self._open_segment(self.current_segment + 1)
            else:
                self._probe_current()
        except (OSError, WalError) as exc:
            log.debug("WAL probe failed: %s", exc)
            return False
        self.healthy = True
        self.last_error = None
        log.warning("WAL at %s is writable again", self._path)
        return True

    def _probe_current(self) -> None:
        try:
            self._write_all(self._fd, _PROBE_BLOCK)
            failure = self._run_in_pool(self._try_fsync, self._fd, self._path)
            if failure is not None:
                raise failure[1]
        finally:
            self._undo_write(self._size)

    def free_bytes(self) -> int:
        """Bytes the WAL's filesystem still takes: lets the broker refuse a change up front rather than
        apply it in memory and then fail to log it. Asked before every change, so one statvfs
        (docs/performance.md#free-space-on-the-wals-disk) serves FREE_CACHE_S, minus what the WAL wrote
        since; but not near full (FREE_CACHE_FLOOR), where other writers could take the rest within that
        time."""
        now = time.monotonic()
        if now - self._free_at < FREE_CACHE_S:
            free = self._free - (self._appended - self._free_appended)
            if free >= FREE_CACHE_FLOOR:
                return free
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return 1 << 62
        self._free, self._free_at, self._free_appended = st.f_bavail * st.f_frsize, now, self._appended
        return self._free

    def rotate(self) -> int:
        """Starts the next segment and returns its number: every earlier change is in lower numbers.

        The old segment is fsynced and closed by the syncer (within one sync interval, and before
        any `after_durable` callback registered after this call), so rotating never waits on disk.
        """
        if not self._open:
            raise WalError(f"WAL at {self.directory} is not open")
        self._open_segment(self.current_segment + 1)
        return self.current_segment

    def delete_segments_before(self, segment: int) -> int:
        """Deletes segment files numbered below `segment` (never the current one); returns the count.

        Unlinking a 64 MiB file can take milliseconds, so it runs in the pool thread.
        """
        doomed = [p for n, p in list_segments(self.directory) if n < segment and n != self.current_segment]
        return self._run_in_pool(_unlink_all, doomed) if doomed else 0

    def total_bytes(self) -> int:
        """Size of all segment files (for metrics and the compactor's size trigger)."""
        total = 0
        for _, path in list_segments(self.directory):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    # ------------------------------------------------------------------ durability

    def after_durable(self, callback: Callable[[], None], on_error: ErrorCallback | None = None) -> None:
        """Runs `callback` once everything appended so far is as durable as `fsync` mode promises.

        `interval`: now (the data is with the OS; a kill -9 loses nothing). `always`: after the next
        group fsync. If that fsync fails, `on_error` gets the WalError instead (or it is logged) and
        the WAL turns unhealthy: the change is not acknowledged as durable.
        """
        if self.fsync_mode == "interval":
            callback()
            return
        if not self._open:
            raise WalError(f"WAL at {self.directory} is closed")
        self._waiting.append((callback, on_error))
        self._wake.set()

    def _interval_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self.sync_interval)
            if self._dirty or self._retired or self._dir_dirty:
                self._sync_round()

    def _always_loop(self) -> None:
        """Group commit; also syncs on the interval so rotated segments get closed without callbacks."""
        while True:
            self._wake.wait(self.sync_interval)
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            error = self._sync_round()
            for callback, on_error in waiting:
                self._notify(callback, on_error, error)
            if self._stopping and not self._waiting:
                return

    @staticmethod
    def _notify(callback: Callable[[], None], on_error: ErrorCallback | None, error: WalError | None) -> None:
        try:
            if error is None:
                callback()
            elif on_error is not None:
                on_error(error)
        except Exception:
            log.exception("an after_durable callback failed")

    def _sync_round(self) -> WalError | None:
        """fsyncs retired segments (then closes them), the current one if written, and the directory."""
        retired, self._retired = self._retired, []
        current = self._fd if self._dirty else -1
        sync_dir = self._dir_dirty
        self._dirty = self._dir_dirty = False
        if not retired and current < 0 and not sync_dir:
            return None
        started = time.perf_counter()
        failure = self._run_in_pool(self._fsync_files, retired, (current, self._path), sync_dir)
        self.last_fsync_seconds = seconds = time.perf_counter() - started
        if self.on_fsync is not None:
            try:
                self.on_fsync(seconds)
            except Exception:
                log.exception("the on_fsync hook failed")
        if failure is None:
            return None
        # After a failed fsync the kernel may have dropped the dirty pages and a later fsync can succeed
        # without them (PostgreSQL's "fsyncgate"): the WAL stays unhealthy until the broker restarts.
        self.fsync_error = self._mark_failed(WalError(_fsync_error_message(failure[0], failure[1])))
        return self.fsync_error

    def _fsync_files(
        self, retired: list[tuple[int, Path]], current: tuple[int, Path], sync_dir: bool
    ) -> tuple[Path, OSError] | None:
        """Runs in the pool thread; returns the first (path, error) instead of raising, so the
        syncer greenlet never dies and retired files are always closed."""
        failures = [self._try_fsync(fd, path, close=True) for fd, path in retired]
        if current[0] >= 0:
            failures.append(self._try_fsync(*current))
        if sync_dir:
            try:
                dir_fd = os.open(self.directory, os.O_RDONLY)
            except OSError as exc:
                failures.append((self.directory, exc))
            else:
                failures.append(self._try_fsync(dir_fd, self.directory, close=True))
        return next((f for f in failures if f is not None), None)

    def _try_fsync(self, fd: int, path: Path, *, close: bool = False) -> tuple[Path, OSError] | None:
        try:
            self._fsync(fd)
        except OSError as exc:
            return path, exc
        finally:
            if close:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return None

    def _run_in_pool(self, fn: Callable[..., R], *args: object) -> R:
        """Runs blocking I/O in a real OS thread; only the calling greenlet waits."""
        if self._pool is None:
            return fn(*args)
        return self._pool.spawn(fn, *args).get()


def _unlink_all(paths: list[Path]) -> int:
    deleted = 0
    for path in paths:
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete old WAL segment %s: %s", path, exc.strerror or exc)
    return deleted
