"""Single-byte flips in a real broker's WAL: does any of them silently lose an acknowledged change?

    python -m loadtest.wal_flip [--tasks 3000] [--flips 50] [--seed N] [--segment-bytes 67108864]

A broker (a subprocess, through the wire) takes `--tasks` SUBMITs and is killed with -9 before any
snapshot, so every acknowledged task lives only in the WAL. Then, `--flips` times, a copy of that data
dir gets one byte flipped at a random offset of a random segment and is recovered (storage.recovery,
reading the files directly, no snapshot). Each outcome is one of:
  stopped      recovery refused, naming the segment and a byte at or before the flip; the file unchanged.
               It is then recovered again with --accept-wal-damage: exactly the records before the damage
               come back and the damaged file sits whole under wal/damaged-*/.
  torn tail    recovery cut the tail: only the record holding the flip (the last one) is missing.
  SILENT LOSS  anything else: recovery started without an acknowledged task and without saying so.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import msgspec

from loadtest.crash_harness import Broker
from storage.model import TaskSubmitted, WalRecord
from storage.recovery import recover
from storage.wal import WalCorruptError, list_segments, wal_directory
from storage.wal_format import HEADER_V1, RECORD_HEAD
from transport import messages as m
from transport.client import Client

_RECORD = msgspec.msgpack.Decoder(WalRecord)


class NoSnapshot:
    """The killed broker never wrote a snapshot: recovery starts from the WAL alone."""

    def load_latest(self) -> None:
        return None


def make_wal(work: Path, tasks: int, segment_bytes: int) -> tuple[Path, set[str]]:
    """A data dir whose WAL holds `tasks` acknowledged SUBMITs; (data dir, their ids)."""
    data_dir = work / "pristine"
    broker = Broker(data_dir, {"TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS": "3600",
                               "TQ_PERSISTENCE__WAL_SEGMENT_BYTES": str(segment_bytes)})
    broker.start()
    acknowledged: set[str] = set()
    try:
        with Client("127.0.0.1", broker.port, timeout=30.0) as client:
            for start in range(0, tasks, 100):
                specs = [m.TaskSpec(kind="flip", payload=random.randbytes(200), queue="flip")
                         for _ in range(min(100, tasks - start))]
                acknowledged.update(client.submit_batch(specs))
    finally:
        broker.kill()
    return data_dir, acknowledged


def records_of(path: Path) -> list[tuple[int, int, str]]:
    """(start, end, task_id) of every record of an intact segment."""
    data, offset, found = path.read_bytes(), HEADER_V1.size, []
    while offset < len(data):
        length = RECORD_HEAD.unpack_from(data, offset)[0]
        end = offset + RECORD_HEAD.size + length
        record = _RECORD.decode(data[offset + RECORD_HEAD.size : end])
        assert isinstance(record, TaskSubmitted)
        found.append((offset, end, record.task.task_id))
        offset = end
    return found


def one_flip(pristine: Path, work: Path, rng: random.Random, acknowledged: set[str],
             layout: dict[Path, list[tuple[int, int, str]]]) -> tuple[str, str]:
    """Flips one byte in a copy of `pristine`, recovers it; (outcome, one line about it)."""
    data_dir = work / "copy"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(pristine, data_dir)
    segments = list_segments(wal_directory(data_dir))
    number, path = rng.choice(segments)
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    records = layout[wal_directory(pristine) / path.name]
    try:
        state = recover(data_dir, NoSnapshot())
    except WalCorruptError as exc:
        return _stopped(exc, data_dir, path, bytes(data), at, number, acknowledged, records, layout)
    lost = acknowledged - set(state.tasks)
    last_start, _, last_id = records[-1]
    is_last_segment = number == segments[-1][0]
    if not lost:
        return "no loss", f"{path.name} byte {at}: all {len(acknowledged)} tasks recovered"
    if lost == {last_id} and is_last_segment and at >= last_start:
        return "torn tail", f"{path.name} byte {at} (in the last record): that record cut, the rest recovered"
    return "SILENT LOSS", f"{path.name} byte {at}: {len(lost)} acknowledged tasks missing, no error"


def _stopped(exc: WalCorruptError, data_dir: Path, path: Path, flipped: bytes, at: int, number: int,
             acknowledged: set[str], records: list[tuple[int, int, str]],
             layout: dict[Path, list[tuple[int, int, str]]]) -> tuple[str, str]:
    damage = exc.damage
    if damage is None or damage.path != path or damage.offset > at or str(path) not in exc.message:
        return "WRONG STOP", f"{path.name} byte {at}: {exc.message}"
    if path.read_bytes() != flipped:
        return "WRONG STOP", f"{path.name} byte {at}: the damaged file was changed"
    state = recover(data_dir, NoSnapshot(), accept_wal_damage=True)
    earlier = {tid for name, recs in layout.items() if int(name.stem[4:]) < number for _, _, tid in recs}
    expected = earlier | {tid for _, end, tid in records if end <= damage.offset}
    moved = list(wal_directory(data_dir).glob(f"damaged-*/{path.name}"))
    if set(state.tasks) != expected or not moved or moved[0].read_bytes() != flipped:
        return "WRONG ACCEPT", f"{path.name} byte {at}: accepting kept {len(state.tasks)} of {len(expected)} tasks"
    return "stopped", (f"{path.name} byte {at}: stopped at byte {damage.offset} ({damage.reason}); accepted: "
                       f"{len(expected)} of {len(acknowledged)} tasks kept, the file moved aside whole")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--flips", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--segment-bytes", type=int, default=67108864, help="persistence.wal_segment_bytes")
    args = parser.parse_args(argv)
    logging.disable(logging.ERROR)  # recovery's own lines (cut tails, accepted damage) would drown the table
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="wal-flip-") as tmp:
        work = Path(tmp)
        pristine, acknowledged = make_wal(work, args.tasks, args.segment_bytes)
        layout = {path: records_of(path) for _, path in list_segments(wal_directory(pristine))}
        print(f"seed {seed}: {len(acknowledged)} acknowledged SUBMITs in {len(layout)} WAL segment(s), "
              f"{sum(p.stat().st_size for p in layout):,} bytes; {args.flips} single-byte flips")
        outcomes: Counter[str] = Counter()
        for i in range(args.flips):
            outcome, line = one_flip(pristine, work, rng, acknowledged, layout)
            outcomes[outcome] += 1
            print(f"  {i + 1:3d} {outcome:12s} {line}")
    bad = outcomes["SILENT LOSS"] + outcomes["WRONG STOP"] + outcomes["WRONG ACCEPT"]
    print(f"stopped the start: {outcomes['stopped']}, proven torn tails: {outcomes['torn tail']}, "
          f"no loss: {outcomes['no loss']}, silent losses: {outcomes['SILENT LOSS']}, "
          f"wrong stops/accepts: {outcomes['WRONG STOP'] + outcomes['WRONG ACCEPT']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
