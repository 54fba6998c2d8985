"""Small helpers shared by the test modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Polls `predicate` until it returns something truthy (returned), or fails the test at the deadline.

    For outcomes that arrive on the broker's timers (leases, heartbeats, history batches): the deadline
    is generous, and the poll returns as soon as the outcome is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(interval)
