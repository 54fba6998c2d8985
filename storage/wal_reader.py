"""The reading side of the write-ahead log: replaying segments at start-up (recovery).

Why a CRC per record: a `kill -9` or power cut in the middle of a write leaves a torn tail; recovery must
tell a torn tail (cut it) from damage (stop and tell the operator). A torn tail can only be at the end:
if any intact record follows the bad spot (`valid_records_after`), it is damage, not an unfinished write.
A segment is never appended to after the process that created it has moved on, so a repaired (truncated)
tail stays the end of its file. Reading runs once, at start-up, in the broker's hub, so a long replay
yields now and then to keep the health endpoints answering.
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
from storage.wal_damage import refusal, set_aside
from storage.wal_format import (
    FORMAT_VERSION,
    HEADER_V1,
    MAGIC,
    PREFIX,
    RECORD_HEAD,
    WalCorruptError,
    WalDamage,
    WalError,
    list_segments,
    segment_path,
)

log = logging.getLogger("tqbroker.wal")  # the writer's logger: one place to look for WAL trouble

_DECODER = msgspec.msgpack.Decoder(WalRecord)
# Every payload is a msgpack map (one header byte: no record has more than 15 fields) whose first key is
# the tag field "type" (msgspec writes the tag first): a record can only start 1 + RECORD_HEAD.size bytes
# before this anchor, so the damage scan looks only there (tests/test_wal_damage.py checks every record type).
_ANCHOR = b"\xa4type"
_ANCHOR_AT = RECORD_HEAD.size + 1

_Parsed = tuple[list[WalRecord], int, str | None]  # records, end of the last good one, damage found


def _read_v1(data: bytes, number: int, path: Path) -> _Parsed:
    """Format version 1: header with the segment number, then length|crc|msgpack records."""
    if len(data) < HEADER_V1.size:
        return [], 0, "short segment header"
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


def read_segments(directory: str | Path, from_segment: int, *, accept_damage: bool = False) -> Iterator[WalRecord]:
    """Yields the records of segments numbered >= `from_segment` (< 1: all of them), in order.

    A torn tail of the LAST segment (a bad record with no intact record after it) is cut off, with a
    warning: that is what a crash mid-write leaves. Anything else - a bad record with intact records
    after it, damage in an earlier segment, a gap in the numbering, a bad header - raises WalCorruptError
    naming the file and byte, because acknowledged changes may sit behind it. With `accept_damage` it
    instead moves the damaged segment and every later one aside (`storage.wal_damage.set_aside`, never
    deleting them) and yields only the records before the damage.
    """
    segments = [(n, p) for n, p in list_segments(directory) if n >= from_segment]
    gap = _find_gap(Path(directory), segments, from_segment)
    if gap is not None:
        segments = [(n, p) for n, p in segments if n < gap.number]
        _refuse_or_set_aside(Path(directory), gap, "", accept_damage)
    for index, (number, path) in enumerate(segments):
        records, damage, detail = _read_segment(number, path, last=index == len(segments) - 1)
        yield from records
        if damage is not None:
            _refuse_or_set_aside(Path(directory), damage, detail, accept_damage)
            return


def _refuse_or_set_aside(directory: Path, damage: WalDamage, detail: str, accept: bool) -> None:
    if not accept:
        raise WalCorruptError(refusal(damage, detail), damage)
    set_aside(directory, damage)


def _find_gap(directory: Path, segments: list[tuple[int, Path]], from_segment: int) -> WalDamage | None:
    """The first missing segment number, if the numbering has a gap (or replay's first segment is gone)."""
    if not segments:
        return None
    expected = from_segment if from_segment >= 1 else segments[0][0]
    for number, _ in segments:
        if number != expected:
            reason = f"missing (replay needs segments {expected}..{number - 1}; changes in it are lost)"
            return WalDamage(expected, segment_path(directory, expected), 0, reason)
        expected += 1
    return None


def _read_segment(number: int, path: Path, *, last: bool) -> tuple[list[WalRecord], WalDamage | None, str]:
    """(records before any bad spot, the damage if it is not a torn tail, what follows the damage)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WalCorruptError(f"cannot read WAL segment {path}: {exc.strerror or exc}") from exc
    header_problem = _header_problem(data, number)
    if header_problem is not None:
        return [], WalDamage(number, path, 0, header_problem), ""
    reader = _READERS[PREFIX.unpack_from(data)[1]] if len(data) >= PREFIX.size else None
    records, good_end, problem = reader(data, number, path) if reader else ([], 0, "short segment header")
    if problem is None:
        return records, None, ""
    following = valid_records_after(data, good_end)
    if following == 0 and last:
        _cut_tail(path, number, good_end, problem, len(data))
        return records, None, ""
    details = [f"{following} intact records follow it"] if following else []
    if not last:
        details.append("later segments were written after it")
    detail = "; ".join(details)
    return records, WalDamage(number, path, good_end, problem), detail


def valid_records_after(data: bytes, bad: int) -> int:
    """How many intact records (length in bounds, CRC-32 matches, decodes as a WalRecord) start after
    byte `bad`; records nested inside an intact one are not counted.

    One is proof of damage rather than a torn write: a crash leaves an unfinished write only at the end.
    A stretch of garbage or zeros (pages persisted out of order) can match a CRC-32 by chance, about
    once in 4 billion candidates, but it must also be a msgpack map of a record type with every field
    of the right type, which random bytes practically never are; zeros never are (length 0 is no
    record). The one way to a false "damage" verdict is a torn record whose client-chosen payload holds
    a whole valid record: the start then stops (nothing is lost) and the operator can accept it.
    Costs about what replaying the rest of the file costs (one `bytes.find`, then a CRC and a decode per
    anchor hit); it runs only when a record is bad, once, at start-up.
    """
    view, count, search = memoryview(data), 0, bad + 1 + _ANCHOR_AT
    while (hit := data.find(_ANCHOR, search)) >= 0:
        end = _intact_record_end(data, view, hit - _ANCHOR_AT)
        if end is None:
            search = hit + 1
            continue
        count += 1
        while (after := _intact_record_end(data, view, end)) is not None:
            count, end = count + 1, after
            if count % 4096 == 0:
                gevent.sleep(0)  # as in a replay: a long scan must not starve the health endpoints
        search = end + _ANCHOR_AT
    return count


def _intact_record_end(data: bytes, view: memoryview, offset: int) -> int | None:
    """The end of the intact record starting at `offset`, or None if there is none there."""
    if offset < HEADER_V1.size or len(data) - offset < RECORD_HEAD.size:
        return None
    length, crc = RECORD_HEAD.unpack_from(data, offset)
    body = offset + RECORD_HEAD.size
    if length == 0 or body + length > len(data):
        return None
    payload = view[body : body + length]
    if zlib.crc32(payload) != crc:
        return None
    try:
        _DECODER.decode(payload)
    except msgspec.DecodeError:
        return None
    return body + length


def _header_problem(data: bytes, number: int) -> str | None:
    """What is wrong with the segment header, or None if it is fine or merely torn (a crash right after
    creating the file: shorter than a header and a prefix of one)."""
    if len(data) < PREFIX.size:
        return None if MAGIC.startswith(data[: len(MAGIC)]) else "bad magic bytes: not a WAL segment header"
    magic, version = PREFIX.unpack_from(data)
    if magic != MAGIC:
        return "bad magic bytes: not a WAL segment header"
    if version not in _READERS:
        return (f"format version {version}, which this broker cannot read (it reads {sorted(_READERS)}): "
                "a newer broker wrote it, or its header is damaged")
    if len(data) >= HEADER_V1.size and (header_number := HEADER_V1.unpack_from(data)[2]) != number:
        return f"its header says it is segment {header_number} (renamed, or a damaged header)"
    return None


def _cut_tail(path: Path, number: int, good_end: int, damage: str, size: int) -> None:
    """Truncates a torn tail (rewriting a torn header) so the file ends at its last good record."""
    log.warning(
        "WAL segment %s: torn tail: %s at byte %d and no intact record after it; cutting the last %d bytes "
        "(an unfinished write from a crash)",
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
