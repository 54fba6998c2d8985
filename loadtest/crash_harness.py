"""Crash harness: SIGKILL the broker again and again under pipelined load; nothing acknowledged may be lost.

    python -m loadtest.crash_harness --kills 20

It starts its own broker (`python -m actors`) on a free port and a temp data dir, and per round:

1. starts (or restarts, same port and data dir) the broker and times recovery: from spawning the
   process until a STATS request is answered;
2. checks with STATUS that every change acknowledged so far is there (see `verify`);
3. runs pipelined load from two client threads: a producer keeps ~100 SUBMITs (and some SUBMIT_BATCHes)
   in flight, a worker CLAIMs, HEARTBEATs and pipelines RESULTs (most ok with result bytes, some failed
   without retry), and both write what the broker acknowledged into a `Ledger`;
4. SIGKILLs the broker at a random moment of that load.

After the last kill it restarts once more and checks everything, then stops the broker with SIGTERM
(a final snapshot), starts it again and checks everything once more. Prints recovery time per restart
and totals; exits 1 on any lost or damaged acknowledged change, or a recovery slower than
`--max-recovery` seconds (docs/protocol.md "Task states", durability: a broker killed at any moment and
restarted loses no acknowledged change; running tasks come back running with their leases, and their
worker may finish them).

`Ledger` and `verify` (loadtest/crash_ledger.py) and `LoadRound` (loadtest/crash_load.py) are also used by
tests/test_durability.py, which imports them from here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.crash_ledger import Ledger, verify
from loadtest.crash_load import LoadRound
from transport.client import Client
from transport.errors import ClientError

__all__ = ["Broker", "Ledger", "LoadRound", "free_port", "main", "verify"]

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """`python -m actors` on a fixed port and data dir, restartable; its output goes to `log_path`."""

    def __init__(self, data_dir: Path, settings: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}-broker.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
        self.env.update({
            "PYTHONPATH": str(ROOT),
            "TQ_BROKER__HOST": "127.0.0.1",
            "TQ_BROKER__PORT": str(self.port),
            "TQ_PERSISTENCE__DATA_DIR": str(data_dir),
            "TQ_MONITORING__PROMETHEUS_PORT": "0",
            "TQ_WORKER__HEARTBEAT_INTERVAL_SECS": "3600",  # the harness worker is never declared dead
            **(settings or {}),
        })
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "actors"], cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def start(self, timeout: float = 120.0) -> float:
        """Spawns the broker; returns the seconds until it answered STATS (its recovery time)."""
        started = time.monotonic()
        self.spawn()
        assert self.proc is not None
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with Client("127.0.0.1", self.port, timeout=timeout) as client:
                    client.stats()
                return time.monotonic() - started
            except ClientError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"broker did not answer within {timeout} s; see {self.log_path}") from None
                time.sleep(0.01)  # polling for the listener

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def rss_bytes(self) -> int:
        """Resident memory of the broker process (from /proc), 0 if unknown."""
        if self.proc is None:
            return 0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def last_recovery_line(self) -> str:
        """The broker's own 'recovered N live tasks ...' log message of its latest start."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            if "recovered" in line:
                try:
                    return str(json.loads(line).get("msg", line))
                except ValueError:
                    return line
        return ""


# ---------------------------------------------------------------------------------------------- main


def _parse_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("TQ_"):
            raise SystemExit(f"--set takes TQ_SECTION__KEY=VALUE, not {pair!r}")
        settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.crash_harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs under load (default 20)")
    parser.add_argument("--min-delay", type=float, default=0.2, help="earliest kill after the first ack, seconds")
    parser.add_argument("--max-delay", type=float, default=2.0, help="latest kill after the first ack, seconds")
    parser.add_argument("--rate", type=float, default=2000, help="SUBMITs per second at most, 0 = unlimited")
    parser.add_argument("--result-rate", type=float, default=1000,
                        help="RESULTs per second at most, 0 = unlimited (STATUS of a task finished before a "
                             "restart reads DuckDB at a few hundred per second, so checking costs more than loading)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the kill moments")
    parser.add_argument("--max-recovery", type=float, default=15.0, help="fail if a recovery takes longer (s)")
    parser.add_argument("--full-verify", action="store_true",
                        help="check every acknowledged change after every restart (default: the round's, a "
                             "sample of older ones, and everything at the end)")
    parser.add_argument("--sample", type=int, default=2000, help="older changes re-checked per restart")
    parser.add_argument("--set", action="append", default=[], metavar="TQ_SECTION__KEY=VALUE",
                        help="broker setting for every start, e.g. TQ_PERSISTENCE__SNAPSHOT_INTERVAL_SECS=0.5")
    parser.add_argument("--data-dir", help="use (and keep) this data dir instead of a temporary one")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    temp = None if args.data_dir else tempfile.mkdtemp(prefix="tq-crash-")
    data_dir = Path(args.data_dir) if args.data_dir else Path(temp) / "data"  # type: ignore[arg-type]
    broker = Broker(data_dir, _parse_settings(args.set))
    ledger = Ledger()
    recoveries: list[float] = []
    problems: list[str] = []
    print(f"crash harness: {args.kills} kills, seed {seed}, data dir {data_dir}, broker log {broker.log_path}")
    try:
        for round_no in range(1, args.kills + 1):
            seconds = broker.start()
            if round_no > 1:
                recoveries.append(seconds)
                checked, found = _check(broker, ledger, args, rng, full=args.full_verify)
                problems += found
                print(f"restart {round_no - 1:>2}/{args.kills}: answered STATS after {seconds:.2f} s "
                      f"[{broker.last_recovery_line()}]; checked {checked} changes, {len(found)} problems",
                      flush=True)
            delay = rng.uniform(args.min_delay, args.max_delay)
            load = LoadRound("127.0.0.1", broker.port, ledger, tag=f"r{round_no}", rate=args.rate,
                             result_rate=args.result_rate)
            load.run(broker.kill, delay)
            print(f"round   {round_no:>2}/{args.kills}: SIGKILL {delay:.2f} s into the load; acknowledged so far: "
                  f"{len(ledger.submitted)} submits, {len(ledger.results)} results, {len(ledger.claimed)} running",
                  flush=True)
        seconds = broker.start()
        recoveries.append(seconds)
        checked, found = _check(broker, ledger, args, rng, full=True)
        problems += found
        print(f"restart {args.kills:>2}/{args.kills}: answered STATS after {seconds:.2f} s "
              f"[{broker.last_recovery_line()}]; checked ALL {checked} changes, {len(found)} problems", flush=True)
        status = broker.terminate()
        seconds = broker.start()
        checked, found = _check(broker, ledger, args, rng, full=True)
        problems += found
        print(f"after SIGTERM (exit {status}) and a start: answered STATS after {seconds:.2f} s; checked ALL "
              f"{checked} changes, {len(found)} problems", flush=True)
        broker.terminate()
    except Exception:
        broker.kill()
        raise
    problems += ledger.anomalies
    slow = [s for s in recoveries if s > args.max_recovery]
    completed = sum(1 for state, _ in ledger.results.values() if state == "completed")
    print()
    print(f"kills: {args.kills}; acknowledged: {len(ledger.submitted)} submits ({ledger.refused} refused), "
          f"{len(ledger.results)} results ({completed} completed, {len(ledger.results) - completed} failed), "
          f"{len(ledger.claimed)} still running, {len(ledger.cancelled)} cancels")
    print(f"recovery (spawn -> STATS answered): min {min(recoveries):.2f} s, mean "
          f"{sum(recoveries) / len(recoveries):.2f} s, max {max(recoveries):.2f} s (limit {args.max_recovery:g} s)")
    print(f"lost or damaged acknowledged changes: {len(problems)}")
    for problem in problems[:20]:
        print("  " + problem)
    if temp is not None and not problems and not slow:
        shutil.rmtree(temp, ignore_errors=True)
    elif temp is not None:
        print(f"data dir and broker log kept in {temp}")
    if problems or slow:
        print("FAIL")
        return 1
    print("OK")
    return 0


def _check(broker: Broker, ledger: Ledger, args: Any, rng: random.Random, full: bool) -> tuple[int, list[str]]:
    with Client("127.0.0.1", broker.port, timeout=120.0, client_name="crash-verify") as client:
        if full:
            return verify(client, ledger)
        with ledger.lock:
            older = [t for t in ledger.submitted if t not in ledger.round_ids]
            ids = list(ledger.round_ids) + rng.sample(older, min(args.sample, len(older)))
        return verify(client, ledger, ids)


if __name__ == "__main__":
    sys.exit(main())
