"""The write-ahead log: every state change is appended here before the broker acknowledges it.

Layout: `DATA_DIR/wal/wal-0000000001.log`, `wal-0000000002.log`, ... Each segment starts with a header
(`b"TQWAL"`, format version u16 big-endian, segment number u64) followed by records
`u32 length | u32 crc32(payload) | payload`, payload = msgpack of a `storage.model.WalRecord`.

Why segments: a snapshot covers everything below some segment number, so retention is "delete the
files below it" instead of rewriting a file. Why a CRC per record: a `kill -9` or power cut in the
middle of a write leaves a torn tail; recovery must tell a torn tail (cut it, nothing acknowledged is
lost) from damage in the middle (stop and tell the operator). A segment is never appended to after
the process that created it has moved on, so a repaired (truncated) tail stays the end of its file.

The appending side runs in the queue actor's greenlet: `append` is a plain `os.write` (fast, no
fsync); fsync runs in a real OS thread (gevent's ThreadPool) from a syncer greenlet, so the hub never
waits on the disk. Reading (`read_segments`) runs once, at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import gevent
import gevent.event
import gevent.threadpool
import msgspec

from storage.model import WalRecord

log = logging.getLogger("tqbroker.wal")

WAL_DIRNAME = "wal"
MAGIC = b"TQWAL"
FORMAT_VERSION = 1
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024

_PREFIX = struct.Struct(">5sH")  # magic + version: the part every format version shares
_HEADER_V1 = struct.Struct(">5sHQ")  # magic + version + segment number
_RECORD_HEAD = struct.Struct(">II")  # payload length, crc32(payload)
_RECORD_PLACEHOLDER = bytes(_RECORD_HEAD.size)
_PROBE_BLOCK = bytes(4096)
_SEGMENT_NAME = re.compile(r"^wal-(\d{10})\.log$")
_DECODER = msgspec.msgpack.Decoder(WalRecord)

FsyncMode = Literal["interval", "always"]
R = TypeVar("R")
ErrorCallback = Callable[["WalError"], None]


class WalError(Exception):
    """A WAL failure; `.message` is one line a user can act on (it goes into ERROR{INTERNAL})."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WalCorruptError(WalError):
    """Damage that recovery must not silently skip: acknowledged changes may sit behind it."""


def wal_directory(data_dir: str | Path) -> Path:
    """Where the segments of a data dir live."""
    return Path(data_dir) / WAL_DIRNAME


def segment_path(directory: str | Path, number: int) -> Path:
    return Path(directory) / f"wal-{number:010d}.log"


def list_segments(directory: str | Path) -> list[tuple[int, Path]]:
    """(number, path) of every segment file in `directory`, ascending; empty if it does not exist."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise WalError(f"cannot list WAL directory {directory}: {exc.strerror or exc}") from None
    found = [(int(m.group(1)), Path(directory) / name) for name in names if (m := _SEGMENT_NAME.match(name))]
    return sorted(found)


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
        self.last_fsync_seconds = 0.0
        self.on_fsync: Callable[[float], None] | None = None
        self.current_segment = 0
        # Seams for fault-injection tests: replace with functions raising OSError.
        self._write: Callable[[int, bytes | bytearray | memoryview], int] = os.write
        self._fsync: Callable[[int], None] = os.fsync
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
            self._write_all(fd, _HEADER_V1.pack(MAGIC, FORMAT_VERSION, number))
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise self._mark_failed(WalError(_os_error_message(path, exc))) from exc
        if self._fd >= 0:
            self._retired.append((self._fd, self._path))
        self._fd, self._path, self._size = fd, path, _HEADER_V1.size
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
        encode_into, pack_into, crc32 = self._encoder.encode_into, _RECORD_HEAD.pack_into, zlib.crc32
        for record in records:
            start = len(buffer)
            buffer += _RECORD_PLACEHOLDER
            encode_into(record, buffer, -1)
            body = start + _RECORD_HEAD.size
            pack_into(buffer, start, len(buffer) - body, crc32(memoryview(buffer)[body:]))
        before = self._size
        try:
            self._write_all(self._fd, buffer)
        except OSError as exc:
            self._undo_write(before)
            raise self._mark_failed(WalError(_os_error_message(self._path, exc))) from exc
        self._size = before + len(buffer)
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
        if not self._open:
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
        """Bytes the WAL's filesystem still takes (one statvfs): lets the broker refuse a change up front
        rather than apply it in memory and then fail to log it."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return 1 << 62
        return st.f_bavail * st.f_frsize

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
        return self._mark_failed(WalError(_os_error_message(failure[0], failure[1])))

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


# ---------------------------------------------------------------------- reading (recovery)

_Parsed = tuple[list[WalRecord], int, str | None]  # records, end of the last good one, damage found


def _read_v1(data: bytes, number: int, path: Path) -> _Parsed:
    """Format version 1: header with the segment number, then length|crc|msgpack records."""
    if len(data) < _HEADER_V1.size:
        return [], 0, "short segment header"
    header_number = _HEADER_V1.unpack_from(data)[2]
    if header_number != number:
        raise WalCorruptError(f"WAL segment {path} says it is segment {header_number}; was it renamed?")
    records: list[WalRecord] = []
    view, end, offset = memoryview(data), len(data), _HEADER_V1.size
    decode, unpack, crc32 = _DECODER.decode, _RECORD_HEAD.unpack_from, zlib.crc32
    while offset < end:
        if end - offset < _RECORD_HEAD.size:
            return records, offset, "short record header"
        length, crc = unpack(data, offset)
        body = offset + _RECORD_HEAD.size
        if body + length > end:
            return records, offset, "short record"
        payload = view[body : body + length]
        if crc32(payload) != crc:
            return records, offset, "checksum mismatch"
        try:
            records.append(decode(payload))
        except msgspec.DecodeError:
            return records, offset, "undecodable record"
        offset = body + length
        if len(records) % 4096 == 0:
            gevent.sleep(0)  # a long replay must not starve the health endpoints
    return records, offset, None


# Every format version ever written keeps its reader here, so a newer broker reads older segments.
_READERS: dict[int, Callable[[bytes, int, Path], _Parsed]] = {1: _read_v1}


def read_segments(directory: str | Path, from_segment: int) -> Iterator[WalRecord]:
    """Yields the records of segments numbered >= `from_segment` (< 1: all of them), in order.

    A torn or damaged tail of the LAST segment is cut off (the file is truncated there, with a
    warning): that is what a crash mid-write leaves. The same damage in an earlier segment, a gap in
    the numbering or an unknown format raises WalCorruptError, since later segments were written
    after it and skipping would silently lose acknowledged changes.
    """
    segments = [(n, p) for n, p in list_segments(directory) if n >= from_segment]
    _check_sequence(Path(directory), segments, from_segment)
    for index, (number, path) in enumerate(segments):
        yield from _read_segment(number, path, last=index == len(segments) - 1)


def _check_sequence(directory: Path, segments: list[tuple[int, Path]], from_segment: int) -> None:
    if not segments:
        return
    expected = from_segment if from_segment >= 1 else segments[0][0]
    for number, _ in segments:
        if number != expected:
            missing = segment_path(directory, expected)
            raise WalCorruptError(
                f"WAL segment {missing} is missing (replay needs segments {expected}..{number - 1}); "
                "changes in it are lost. Move the WAL files from "
                f"{number} on aside to start from the snapshot alone"
            )
        expected += 1


def _read_segment(number: int, path: Path, *, last: bool) -> list[WalRecord]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WalCorruptError(f"cannot read WAL segment {path}: {exc.strerror or exc}") from exc
    reader = _reader_for(data, path)
    records, good_end, damage = reader(data, number, path) if reader else ([], 0, "short segment header")
    if damage is None:
        return records
    if not last:
        raise WalCorruptError(
            f"WAL segment {path} is damaged at byte {good_end} ({damage}) and is not the newest "
            f"segment. Move the file aside to start without it; changes after byte {good_end} in it "
            "and in later segments may be lost"
        )
    _cut_tail(path, number, good_end, damage, len(data))
    return records


def _reader_for(data: bytes, path: Path) -> Callable[[bytes, int, Path], _Parsed] | None:
    """The reader for the segment's version, or None for a torn header (a crash right after create)."""
    if len(data) < _PREFIX.size:
        if MAGIC.startswith(data[: len(MAGIC)]):
            return None
        raise WalCorruptError(f"{path} is not a WAL segment (bad magic bytes)")
    magic, version = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WalCorruptError(f"{path} is not a WAL segment (bad magic bytes)")
    reader = _READERS.get(version)
    if reader is None:
        raise WalCorruptError(
            f"WAL segment {path} has format version {version}, which this broker cannot read "
            f"(it reads {sorted(_READERS)}); run a newer broker"
        )
    return reader


def _cut_tail(path: Path, number: int, good_end: int, damage: str, size: int) -> None:
    """Truncates a torn tail (rewriting a torn header) so the file ends at its last good record."""
    log.warning(
        "WAL segment %s: %s at byte %d; cutting the last %d bytes (an unfinished write from a crash)",
        path, damage, good_end, size - good_end,
    )
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, good_end)
            if good_end == 0:
                os.write(fd, _HEADER_V1.pack(MAGIC, FORMAT_VERSION, number))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WalError(f"cannot repair WAL segment {path}: {exc.strerror or exc}") from exc
