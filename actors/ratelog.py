"""RateLimitedLog: at most `burst` log lines per key (e.g. a peer's IP) per interval, so an attacker cannot
flood the log while a few honest mistakes (a mistyped key) are all logged. Events past the burst are
counted, and the next line logged for that key says how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

MAX_KEYS = 10_000  # keys remembered at once; past this the oldest are forgotten (their counts unlogged)


class RateLimitedLog:
    """One owner (the hub's greenlets, which never run at once); `log` is cheap when suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, burst: int = 10) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.burst = burst
        self._windows: dict[str, list[float]] = {}  # key -> [window start, lines logged in it, suppressed]

    def log(self, level: int, key: str, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> bool:
        """Logs `msg % args` unless `key` already had `burst` lines in this interval; True if logged."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval_s:
            suppressed = int(window[2]) if window is not None else 0
            self._windows.pop(key, None)
            window = self._windows[key] = [now, 0, 0]
            if len(self._windows) > MAX_KEYS:
                del self._windows[next(iter(self._windows))]
            if suppressed:
                msg += f" ({suppressed} more like this suppressed before)"
        elif window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        self.logger.log(level, msg, *args, extra=extra)
        return True
