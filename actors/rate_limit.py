"""A token bucket: at most `rate` takes per second on average, at most `rate` at once (burst = rate,
at least 1 so that a rate under 1/s still lets a take through now and then).

Pure (time is passed in), so it is unit-tested on its own; the queue actor keeps one per rate-limited
queue and takes one token per task it hands out from that queue.
"""

from __future__ import annotations


class TokenBucket:
    """Holds up to `capacity` tokens; refills at `rate` tokens per second."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = now

    def available(self, now: float) -> int:
        """Whole tokens available at `now` (after refilling for the time since the last call)."""
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return int(self.tokens)

    def take(self, n: int, now: float) -> int:
        """Takes up to `n` whole tokens; returns how many were taken."""
        taken = min(n, self.available(now))
        self.tokens -= taken
        return taken
