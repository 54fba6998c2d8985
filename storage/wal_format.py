"""The on-disk shape of the write-ahead log, shared by the writer (`storage.wal`) and the reader
(`storage.wal_reader`).

Layout: `DATA_DIR/wal/wal-0000000001.log`, `wal-0000000002.log`, ... Each segment starts with a header
(`b"TQWAL"`, format version u16 big-endian, segment number u64) followed by records
`u32 length | u32 crc32(payload) | payload`, payload = msgpack of a `storage.model.WalRecord`.

Why a separate module: the writer and the reader must agree byte for byte on these structs, and the
writer re-exports the reader, so the definitions live below both to keep the imports one-way.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

WAL_DIRNAME = "wal"
MAGIC = b"TQWAL"
FORMAT_VERSION = 1

PREFIX = struct.Struct(">5sH")  # magic + version: the part every format version shares
HEADER_V1 = struct.Struct(">5sHQ")  # magic + version + segment number
RECORD_HEAD = struct.Struct(">II")  # payload length, crc32(payload)
SEGMENT_NAME = re.compile(r"^wal-(\d{10})\.log$")
ACCEPT_FLAG = "--accept-wal-damage"


class WalError(Exception):
    """A WAL failure; `.message` is one line a user can act on (it goes into ERROR{INTERNAL})."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class WalDamage:
    """Where replay has to stop: bytes [0, offset) of segment `number` hold intact records (offset 0: not
    even the header is usable, or the segment is missing); the rest of it and every later segment do not."""

    number: int
    path: Path
    offset: int
    reason: str


class WalCorruptError(WalError):
    """Damage that recovery must not silently skip: acknowledged changes may sit behind it.

    `damage` says where, when recovery could start from the records before it (`--accept-wal-damage`).
    """

    def __init__(self, message: str, damage: WalDamage | None = None) -> None:
        super().__init__(message)
        self.damage = damage


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
    found = [(int(m.group(1)), Path(directory) / name) for name in names if (m := SEGMENT_NAME.match(name))]
    return sorted(found)
