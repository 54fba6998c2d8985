"""QueryGate: how many QUERYs run in the database at once, and in what order the others wait.

The database process answers QUERYs on two reader threads, first come first served, so two slow
queries of one client held both and a `SELECT 1` of another client waited for them. The gate admits
at most `api.max_concurrent_queries` into the database at once and at most ONE per connection; the
others wait here in arrival order, and a freed slot goes to the oldest waiting query whose connection
has none running. A connection's own cap (`api.max_queries_per_connection`, in flight = running +
waiting) is checked by the connection before it asks the gate.

One owner: the greenlets of one hub, which never run at once, so nothing here needs a lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import gevent.event


class QueryGate:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running: dict[object, int] = {}  # connection -> its queries in the database (0 or 1)
        self._waiting: list[tuple[object, gevent.event.Event]] = []  # arrival order

    @contextlib.contextmanager
    def slot(self, conn: object) -> Iterator[None]:
        """Holds a database slot for `conn` while the block runs; waits (in order) until one is free."""
        entry = (conn, gevent.event.Event())
        self._waiting.append(entry)
        self._grant()
        try:
            entry[1].wait()
        except BaseException:  # killed while waiting (the connection closed): leave the line
            if entry in self._waiting:
                self._waiting.remove(entry)
            else:  # the slot was granted just before: give it back
                self._leave(conn)
            raise
        try:
            yield
        finally:
            self._leave(conn)

    def _enter(self, conn: object) -> None:
        self.running[conn] = self.running.get(conn, 0) + 1

    def _leave(self, conn: object) -> None:
        left = self.running.get(conn, 0) - 1
        if left > 0:
            self.running[conn] = left
        else:
            self.running.pop(conn, None)
        self._grant()

    def _grant(self) -> None:
        """Hands free slots to the oldest waiting queries whose connections have none running."""
        i = 0
        while i < len(self._waiting) and sum(self.running.values()) < self.slots:
            conn, event = self._waiting[i]
            if self.running.get(conn):
                i += 1
                continue
            del self._waiting[i]
            self._enter(conn)
            event.set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)
