"""Long-poll CLAIMs: claims that found no work and wait for it as stored reply addresses.

A `ClaimWaiters` belongs to one QueueActor and is only touched from its handlers (so it needs no
locks). It never changes a task itself: it asks the actor to claim for a waiter (`claim`, the actor's
own state-machine path) and to queue the answer (`reply`, so the answer leaves with the actor's WAL
commit like any other). Why a separate object: the bookkeeping (per-queue lines, deadlines, withdrawal
when a connection closes) is independent of the task state machine and easier to read on its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from transport.messages import Assigned, Assignment, Claim, Message

ClaimFor = Callable[[str, list[str], int, float], list[Assignment]]  # worker_id, queues, max_tasks, now
Reply = Callable[[Any, Message], None]  # reply_to, message


class Waiter:
    """A CLAIM waiting for work: answered when a task arrives in one of its queues or at its deadline."""

    __slots__ = ("request_id", "worker_id", "queues", "max_tasks", "reply_to", "deadline", "done")

    def __init__(self, claim: Claim, max_tasks: int, reply_to: Any, deadline: float) -> None:
        self.request_id = claim.id
        self.worker_id = claim.worker_id
        self.queues = claim.queues
        self.max_tasks = max_tasks
        self.reply_to = reply_to
        self.deadline = deadline
        self.done = False


class ClaimWaiters:
    """The waiting CLAIMs of one queue actor: a line per queue (oldest first) and a list for deadlines.

    A waiter on several queues stands in several lines; `done` marks it answered (or withdrawn) so the
    other lines and the deadline sweep skip it lazily instead of searching for it.
    """

    def __init__(self, has_pending: Callable[[Iterable[str]], bool], claim: ClaimFor, reply: Reply) -> None:
        self._has_pending = has_pending
        self._claim = claim
        self._queue_reply = reply
        self.lines: dict[str, deque[Waiter]] = {}
        self.waiting: list[Waiter] = []

    def park(self, claim: Claim, max_tasks: int, reply_to: Any, deadline: float) -> None:
        """Stores `claim` until a task arrives in one of its queues or `deadline` passes."""
        waiter = Waiter(claim, max_tasks, reply_to, deadline)
        for queue in dict.fromkeys(claim.queues):
            self.lines.setdefault(queue, deque()).append(waiter)
        self.waiting.append(waiter)

    def serve(self, queue: str, now: float) -> None:
        """Hands newly pending work in `queue` to the claims waiting on it, oldest first."""
        line = self.lines.get(queue)
        while line and self._has_pending((queue,)):
            waiter = line.popleft()
            if waiter.done:
                continue
            waiter.done = True
            tasks = self._claim(waiter.worker_id, waiter.queues, waiter.max_tasks, now)
            self._queue_reply(waiter.reply_to, Assigned(id=waiter.request_id, tasks=tasks))
        if line is not None and not line:
            del self.lines[queue]

    def expire(self, now: float, everyone: bool = False) -> None:
        """Answers the claims whose deadline passed (all of them with `everyone`) with no tasks."""
        if not self.waiting:
            return
        keep = []
        for waiter in self.waiting:
            if waiter.done:
                continue
            if everyone or waiter.deadline <= now:
                waiter.done = True
                self._queue_reply(waiter.reply_to, Assigned(id=waiter.request_id, tasks=[]))
            else:
                keep.append(waiter)
        self.waiting = keep
        if everyone:
            self.lines.clear()

    def withdraw(self, actor_urn: str) -> None:
        """The connection `actor_urn` closed: its waiting claims must not take tasks nobody would get."""
        for waiter in self.waiting:
            if waiter.reply_to.actor_urn == actor_urn:
                waiter.done = True
