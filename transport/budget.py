"""FrameBudget: the server-wide bound on bytes of frames being received (`broker.max_inflight_frame_bytes`).

A connection reserves a frame's announced length as soon as the header is in, before it reads the body,
and releases it once the frame is complete (handed on) or the connection closes. A reservation that
does not fit waits, in arrival order, until enough is released or its deadline passes; the caller then
refuses the frame. So the memory held in partially received frames never exceeds the limit, whatever
the number or shape of the connections.

All callers run on one gevent hub: no lock is needed, and nothing yields between a check and the
change it guards.
"""

from __future__ import annotations

from collections import deque

import gevent.event


class _Waiter:
    __slots__ = ("n", "event", "granted")

    def __init__(self, n: int) -> None:
        self.n = n
        self.event = gevent.event.Event()
        self.granted = False


class FrameBudget:
    """Reserve / release bytes against a fixed limit; waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserved = 0
        self._waiters: deque[_Waiter] = deque()

    def try_reserve(self, n: int) -> bool:
        """Reserves `n` bytes now if they fit and nobody is waiting ahead; never waits."""
        if self._waiters or self.reserved + n > self.limit:
            return False
        self.reserved += n
        return True

    def reserve(self, n: int, timeout: float) -> bool:
        """Reserves `n` bytes, waiting at most `timeout` seconds behind earlier waiters; False if not.

        `n` larger than the whole limit can never fit and is refused at once.
        """
        if self.try_reserve(n):
            return True
        if n > self.limit or timeout <= 0:
            return False
        waiter = _Waiter(n)
        self._waiters.append(waiter)
        try:
            waiter.event.wait(timeout)
        finally:
            # Whether the bytes were handed over is `granted`, not what wait() returned: a grant that
            # lands between the timeout and this greenlet resuming must not leak.
            if not waiter.granted:
                self._waiters.remove(waiter)
                self._wake()
        return waiter.granted

    def release(self, n: int) -> None:
        """Gives back `n` bytes reserved earlier and hands them to the waiters that now fit, in order."""
        self.reserved -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.reserved + self._waiters[0].n <= self.limit:
            waiter = self._waiters.popleft()
            self.reserved += waiter.n
            waiter.granted = True
            waiter.event.set()

    @property
    def waiting(self) -> int:
        """Reservations waiting for budget now."""
        return len(self._waiters)
