"""What recovery does with WAL damage that is not a torn tail: refuse to start, naming the file and byte,
or - when the operator started the broker with `--accept-wal-damage` - move the damaged segment and
every later one aside and go on from the records before the damage.

Nothing is ever deleted here: the moved files keep every byte, so the lost changes can still be
examined or salvaged. The intact part of the damaged segment (its header and the records before the
damage) is written back under the segment's own name, so those records stay in the WAL for the
next start too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from storage.wal_format import ACCEPT_FLAG, HEADER_V1, WalDamage, WalError, list_segments

log = logging.getLogger("tqbroker.wal")


def refusal(damage: WalDamage, detail: str) -> str:
    """The one line a start without the flag stops with: file, byte, reason, what to do."""
    found = f"; {detail}" if detail else ""
    if damage.offset == 0 and not damage.path.exists():
        where = f"WAL segment {damage.path} is {damage.reason}"
    else:
        where = f"WAL segment {damage.path} is damaged at byte {damage.offset} ({damage.reason}{found})"
    return (
        f"{where}. Acknowledged changes after that point may be lost. Start with {ACCEPT_FLAG} to move it "
        "and every later segment aside (nothing is deleted) and start from the records before it"
    )


def set_aside(directory: Path, damage: WalDamage) -> Path:
    """Moves segment `damage.number` and every later one into `directory/damaged-<UTC time>/`, writes
    the intact bytes [0, damage.offset) of the damaged segment back under its name (when they hold any
    record), fsyncs both directories, and logs at ERROR what moved where. Returns the new folder."""
    moved = [path for number, path in list_segments(directory) if number >= damage.number]
    target = _new_folder(directory)
    try:
        for path in moved:
            os.rename(path, target / path.name)
        if damage.offset > HEADER_V1.size and damage.path in moved:
            _write_prefix(target / damage.path.name, damage.path, damage.offset)
        _fsync_dir(target)
        _fsync_dir(directory)
    except OSError as exc:
        raise WalError(f"cannot move damaged WAL segments to {target}: {exc.strerror or exc}; "
                       "free space or fix permissions there and retry") from exc
    kept = f"; its first {damage.offset} bytes (intact) stay as {damage.path}" if damage.offset > HEADER_V1.size else ""
    log.error(
        "accepting WAL damage (%s): segment %s is %s at byte %d; moved %s to %s%s. Acknowledged changes "
        "after byte %d of segment %d and in every later segment may be lost",
        ACCEPT_FLAG, damage.path.name, "damaged" if damage.path in moved else "missing",
        damage.offset, ", ".join(p.name for p in moved) or "nothing", target, kept, damage.offset, damage.number,
    )
    return target


def _new_folder(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for attempt in range(1000):
        target = directory / (f"damaged-{stamp}" if attempt == 0 else f"damaged-{stamp}-{attempt}")
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
        except OSError as exc:
            raise WalError(f"cannot create {target} for damaged WAL segments: {exc.strerror or exc}") from exc
    raise WalError(f"cannot create a damaged-{stamp} folder in {directory}: 1000 of them exist")


def _write_prefix(source: Path, destination: Path, size: int) -> None:
    with open(source, "rb") as f:
        data = f.read(size)
    with open(destination, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

