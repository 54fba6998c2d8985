"""The one exponential backoff: every wait that doubles after a failure (the worker's re-dial, the SDK's
result polling, the broker's retry delay) is computed here."""

from __future__ import annotations


def backoff_delay(attempt: int, first: float, cap: float) -> float:
    """The wait before try number `attempt` (1-based): `first` × 2^(attempt-1), never above `cap`.

    Attempts below 1 count as 1, so the result is always within [min(first, cap), cap].
    """
    exponent = max(attempt - 1, 0)
    if exponent >= 64:  # 2**64 × any positive first is past every cap; avoid float overflow
        return cap
    return min(first * 2**exponent, cap)
