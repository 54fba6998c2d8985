"""The reading side of the write-ahead log: replaying segments at start-up (recovery).

Why a CRC per record: a `kill -9` or power cut in the middle of a write leaves a torn tail; recovery must
tell a torn tail (cut it, nothing acknowledged is lost) from damage in the middle (stop and tell the
operator). A segment is never appended to after the process that created it has moved on, so a repaired
(truncated) tail stays the end of its file. Reading runs once, at start-up, in the broker's hub, so a long
replay yields now and then to keep the health endpoints answering.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import msgspec

from storage.model import WalRecord
from storage.wal_format import (
    FORMAT_VERSION,
    HEADER_V1,
    MAGIC,
    PREFIX,
    RECORD_HEAD,
    WalCorruptError,
    WalError,
    list_segments,
    segment_path,
)

log = logging.getLogger("tqbroker.wal")  # the writer's logger: one place to look for WAL trouble

_DECODER = msgspec.msgpack.Decoder(WalRecord)

_Parsed = tuple[list[WalRecord], int, str | None]  # records, end of the last good one, damage found


def _read_v1(data: bytes, number: int, path: Path) -> _Parsed:
    """Format version 1: header with the segment number, then length|crc|msgpack records."""
    if len(data) < HEADER_V1.size:
        return [], 0, "short segment header"
    header_number = HEADER_V1.unpack_from(data)[2]
    if header_number != number:
        raise WalCorruptError(f"WAL segment {path} says it is segment {header_number}; was it renamed?")
    records: list[WalRecord] = []
    view, end, offset = memoryview(data), len(data), HEADER_V1.size
    decode, unpack, crc32 = _DECODER.decode, RECORD_HEAD.unpack_from, zlib.crc32
    while offset < end:
        if end - offset < RECORD_HEAD.size:
            return records, offset, "short record header"
        length, crc = unpack(data, offset)
        body = offset + RECORD_HEAD.size
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
    if len(data) < PREFIX.size:
        if MAGIC.startswith(data[: len(MAGIC)]):
            return None
        raise WalCorruptError(f"{path} is not a WAL segment (bad magic bytes)")
    magic, version = PREFIX.unpack_from(data)
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
                os.write(fd, HEADER_V1.pack(MAGIC, FORMAT_VERSION, number))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WalError(f"cannot repair WAL segment {path}: {exc.strerror or exc}") from exc
