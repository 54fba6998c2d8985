"""IdleSweeper: one greenlet that closes every connection idle past `broker.connection_timeout_secs`.

Why not a socket timeout: with `sock.settimeout(t)` gevent builds a Timeout (a timer started and
cancelled on the hub) for every `recv` and every `sendall`, about a dozen Python calls per request on
figure a of the benchmark. Here a connection only stamps `time.monotonic()` when bytes arrive, and
this sweeper looks at all stamps a few times per timeout. The price is precision: a connection is
closed between `timeout` and `timeout + interval` after its last activity.

The sweeper knows nothing of protocols: each watched connection decides in `sweep(now)` whether it is
idle (and whether something spares it, like a waiting long-poll CLAIM) and how to close itself.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import gevent

log = logging.getLogger("tqbroker.connection")

MIN_INTERVAL_S = 0.5


class Sweepable(Protocol):
    def sweep(self, now: float) -> None:
        """Closes the connection if it has been idle too long at monotonic time `now`."""


class IdleSweeper:
    """Watches the open connections of one broker; its greenlet runs only while there are some."""

    def __init__(self) -> None:
        self._watched: set[Sweepable] = set()
        self._interval = float("inf")
        self._greenlet: gevent.Greenlet | None = None

    def watch(self, conn: Sweepable, timeout_s: float) -> None:
        """Starts watching `conn`; it is looked at every max(0.5 s, timeout / 4)."""
        self._watched.add(conn)
        self._interval = min(self._interval, max(MIN_INTERVAL_S, timeout_s / 4))
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def unwatch(self, conn: Sweepable) -> None:
        self._watched.discard(conn)

    def _run(self) -> None:
        # No yield between the emptiness check and clearing `_greenlet`: a `watch` in between is
        # impossible on one hub, so a watched connection always has a running sweeper.
        while self._watched:
            gevent.sleep(self._interval)
            now = time.monotonic()
            for conn in list(self._watched):
                try:
                    conn.sweep(now)
                except Exception:  # one broken connection must not stop the sweeping of the others
                    log.exception("idle check of a connection failed")
        self._greenlet = None
