"""A raw-socket protocol fuzzer with a canary client: does the broker stay correct under garbage?

    python -m loadtest.fuzz --host 127.0.0.1 --port 6379 --seconds 60 [--pid PID] [--seed N] [--json FILE]
    python -m loadtest.fuzz --attack partial-frames|slowloris|hello-flood --conns 1000 [--interval 20] ...

With --attack, the frame fuzzing below is replaced by one connection-level attack of
`loadtest.fuzz_hostile` (see its docstring), with the same canary, RSS and summary, plus how long a fresh
legitimate connection took to be served.

Fuzz threads open their own connections and send, by kind:

  random_bytes   random bytes, no framing at all
  random_type    a MessagePack map with an `id` under a random type byte (unknown types must be answered
                 UNKNOWN_TYPE echoing the id, and the connection must stay usable)
  mutated        a valid request of a random type with fields deleted, retyped, out of range, oversized,
                 deeply nested or unknown; each is followed by a STATS probe that must be answered
  pipelined      2-60 valid or mutated requests in one write; every id must be answered
  bitflip        a valid frame with random bits flipped, header included
  truncated      a valid frame cut short, then the connection closed
  zero_length    length 0: BAD_FRAME and close
  oversize       a length over max_frame_bytes: FRAME_TOO_LARGE and close, without the body being read
  stalled_big    a frame announcing exactly max_frame_bytes (16 MiB), most of it sent, then a stall; then
                 either abandoned or completed (a STATS with a 16 MiB pad that must be answered)
  abandoned      connect and vanish: at once, mid-header, after unanswered requests, with an RST, or
                 with a long-poll CLAIM waiting
  sql            QUERY statements that write, read files or run two statements: all must be refused

Every reply is decoded; an undecodable reply, an unknown error code, an INTERNAL error, an expected
reply that never came or a refused-SQL statement that ran is an *anomaly* (reported, not fatal).

The canary is a well-behaved client on its own connection and queue: submit / claim / complete / status
round trips with random payloads, priority order in batches, fail and cancel paths, STATS, and whether a
task submitted after an abandoned long-poll CLAIM still reaches a live worker. Each round is a check.

At the end it prints a summary: frames sent by kind, errors received by code, canary checks ok/failed,
broker RSS start/end/max (psutil, with --pid) and whether the broker survived. Exit status 1 if any
canary check failed or the broker died (or is unreachable at the end), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from typing import Any

from loadtest.fuzz_attacks import KIND_WEIGHTS, REFUSED_SQL, Fuzzer
from loadtest.fuzz_canary import Canary
from loadtest.fuzz_gen import Gen
from loadtest.fuzz_hostile import ATTACKS, Attack, attack_summary, format_attack
from loadtest.fuzz_wire import HEADER, REQ, Options, RawConn, Tally, frame, pack
from transport.client import Client
from transport.errors import BrokerError, ClientError

# The fuzzer's parts live in loadtest.fuzz_wire, fuzz_gen, fuzz_attacks and fuzz_canary; these names stay
# importable from here.
__all__ = [
    "DEFAULT_MAX_FRAME", "HEADER", "KIND_WEIGHTS", "REFUSED_SQL", "REQ", "Canary", "Fuzzer", "Gen", "Options",
    "RawConn", "RssWatch", "Tally", "frame", "main", "pack", "parse_args", "run",
]

DEFAULT_MAX_FRAME = 16 * 1024 * 1024


# ------------------------------------------------------------------ broker RSS


class RssWatch:
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self.died = False
        self.proc: Any = None
        if pid is not None:
            import psutil

            self.psutil = psutil
            self.proc = psutil.Process(pid)
            self.sample()

    def sample(self) -> None:
        if self.proc is None or self.died:
            return
        try:
            if self.proc.status() == self.psutil.STATUS_ZOMBIE:
                raise self.psutil.NoSuchProcess(self.pid)
            self.samples.append(self.proc.memory_info().rss)
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            self.died = True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.25):
            self.sample()


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


# ------------------------------------------------------------------ main


def broker_reachable(opts: Options) -> bool:
    try:
        with Client(opts.host, opts.port, api_key=opts.api_key, timeout=5.0, tls=opts.tls,
                    ca_file=opts.ca_file) as c:
            c.stats()
        return True
    except (BrokerError, ClientError, OSError):
        return False


def run(opts: Options) -> dict[str, Any]:
    tally = Tally()
    stop = threading.Event()
    watch = RssWatch(opts.pid)
    canary = Canary(opts, tally, stop)
    attack = Attack(opts, opts.attack, opts.conns, opts.interval, stop) if opts.attack else None
    if attack is not None:
        threads = [threading.Thread(target=attack.run, daemon=True, name="attack"),
                   threading.Thread(target=attack.probe_loop, daemon=True, name="probe")]
    else:
        fuzzer = Fuzzer(opts, tally, stop)
        threads = [threading.Thread(target=fuzzer.run_worker, args=(i,), daemon=True, name=f"fuzz-{i}")
                   for i in range(opts.workers)]
    threads.append(threading.Thread(target=canary.run_loop, daemon=True, name="canary"))
    threads.append(threading.Thread(target=watch.run, args=(stop,), daemon=True, name="rss"))
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - started < opts.seconds:
            time.sleep(0.2)
            watch.sample()
            if watch.died:
                break
    except KeyboardInterrupt:
        pass
    stop.set()
    fuzzed = time.monotonic() - started
    for t in threads:
        t.join(timeout=30)
    joined = time.monotonic() - started
    watch.sample()
    if not watch.died:
        canary.final_checks()
        watch.sample()
    elapsed = time.monotonic() - started
    alive = not watch.died and broker_reachable(opts)
    rss = watch.samples
    latency = sorted(tally.canary_latency)
    summary: dict[str, Any] = {
        "seconds": round(elapsed, 1),
        "fuzz_seconds": round(fuzzed, 1),
        "wind_down_seconds": round(joined - fuzzed, 1),
        "final_check_seconds": round(elapsed - joined, 1),
        "target": f"{opts.host}:{opts.port}",
        "seed": opts.seed,
        "frames_sent": dict(sorted(tally.sent.items())),
        "frames_sent_total": sum(tally.sent.values()),
        "errors_by_code": dict(tally.errors.most_common()),
        "replies_by_type": dict(tally.replies.most_common()),
        "connections_opened": tally.connections,
        "connections_closed_by_broker": tally.closed_by_broker,
        "anomalies": dict(tally.anomalies),
        "anomaly_examples": tally.anomaly_examples,
        "canary_ok": tally.canary_ok,
        "canary_failed": tally.canary_failed,
        "canary_failures": tally.canary_failures,
        "canary_latency_p50_s": round(latency[len(latency) // 2], 4) if latency else None,
        "canary_latency_max_s": round(latency[-1], 4) if latency else None,
        "rss_start_bytes": rss[0] if rss else None,
        "rss_end_bytes": rss[-1] if rss else None,
        "rss_max_bytes": max(rss) if rss else None,
        "broker_alive": alive,
    }
    summary["passed"] = alive and tally.canary_failed == 0 and tally.canary_ok > 0
    if attack is not None:
        summary["attack"] = opts.attack
        summary["attack_conns"] = opts.conns
        summary.update(attack_summary(attack.tally))
        summary["passed"] = summary["passed"] and summary["legit_connects_over_1s_or_failed"] == 0
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"fuzz summary: {s['seconds']} s against {s['target']} (seed {s['seed']}; fuzzing {s['fuzz_seconds']} s, "
             f"wind-down {s['wind_down_seconds']} s, final checks {s['final_check_seconds']} s)",
             f"frames sent by kind ({s['frames_sent_total']} in all):"]
    lines += [f"  {k:<14} {v}" for k, v in s["frames_sent"].items()]
    lines.append("errors received by code:")
    lines += [f"  {k:<22} {v}" for k, v in s["errors_by_code"].items()] or ["  (none)"]
    lines.append("replies by type: " + ", ".join(f"{k} {v}" for k, v in s["replies_by_type"].items()))
    lines.append(f"connections: {s['connections_opened']} opened, {s['connections_closed_by_broker']} closed by broker")
    lines.append(f"anomalies: {sum(s['anomalies'].values())}" +
                 "".join(f"\n  {k}: {v}" for k, v in s["anomalies"].items()))
    lines += [f"    e.g. {e}" for e in s["anomaly_examples"][:10]]
    lines.append(f"canary checks: {s['canary_ok']} ok, {s['canary_failed']} failed "
                 f"(latency p50 {s['canary_latency_p50_s']} s, max {s['canary_latency_max_s']} s)")
    lines += [f"    {f}" for f in s["canary_failures"][:10]]
    if s["rss_start_bytes"] is not None:
        lines.append(f"broker RSS: start {mib(s['rss_start_bytes'])}, end {mib(s['rss_end_bytes'])}, "
                     f"max {mib(s['rss_max_bytes'])}")
    else:
        lines.append("broker RSS: not measured (pass --pid)")
    if "attack" in s:
        lines += format_attack(s["attack"], s["attack_conns"], s)
    lines.append(f"broker: {'alive' if s['broker_alive'] else 'DEAD or unreachable'}")
    lines.append(f"result: {'PASS' if s['passed'] else 'FAIL'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--pid", type=int, help="the broker's pid: RSS is sampled and its death noticed")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--workers", type=int, default=4, help="fuzzing threads (each on its own connections)")
    p.add_argument("--stall-conns", type=int, default=2, help="16 MiB frames stalled at once (0 = none)")
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME, help="the broker's max_frame_bytes")
    p.add_argument("--api-key", default=os.environ.get("TQ_API_KEY"), help="API key (env TQ_API_KEY)")
    p.add_argument("--tls", action="store_true", help="talk TLS to the broker")
    p.add_argument("--ca-file", default=os.environ.get("TQ_TLS_CA"), help="CA bundle for --tls (env TQ_TLS_CA)")
    p.add_argument("--attack", choices=ATTACKS, help="a connection-level attack instead of frame fuzzing")
    p.add_argument("--conns", type=int, default=400, help="attacker connections kept open (--attack)")
    p.add_argument("--interval", type=float, default=20.0, help="slowloris: seconds between one connection's bytes")
    p.add_argument("--json", dest="json_path", help="also write the summary as JSON to this file")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    return Options(a.host, a.port, a.seconds, a.pid, seed, a.workers, a.stall_conns, a.max_frame_bytes,
                   a.api_key, a.tls or bool(a.ca_file), a.ca_file, a.json_path, a.quiet, a.attack, a.conns,
                   a.interval)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not broker_reachable(opts):
        print(f"fuzz: broker not reachable at {opts.host}:{opts.port}", file=sys.stderr)
        return 1
    summary = run(opts)
    print(format_summary(summary))
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
