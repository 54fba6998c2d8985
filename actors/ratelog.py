"""RateLimitedLog: at most one log line per key (e.g. a peer's IP) per interval, so an attacker cannot
flood the log. The first event of a key is logged at once; later ones within the interval are counted,
and the next line logged for that key says how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

MAX_KEYS = 10_000  # keys remembered at once; past this the oldest are forgotten (their counts unlogged)


class RateLimitedLog:
    """One owner (the hub's greenlets, which never run at once); `log` is cheap when suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # key -> (monotonic time last logged, suppressed since)

    def log(self, level: int, key: str, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> bool:
        """Logs `msg % args` unless `key` was logged within the interval; True if it was logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        if suppressed:
            msg += f" ({suppressed} more like this suppressed since the last one)"
        self._last.pop(key, None)
        self._last[key] = (now, 0)
        if len(self._last) > MAX_KEYS:
            del self._last[next(iter(self._last))]
        self.logger.log(level, msg, *args, extra=extra)
        return True
