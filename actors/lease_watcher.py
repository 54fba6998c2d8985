"""LeaseWatcherActor: every `broker.lease_check_interval_secs`, sends expired leases back to pending.

It owns no task state: it is the clock that asks the queue actor, which owns the leases, to return
every run whose lease ran out (docs/protocol.md: pending again, the run counted). The queue actor
already expires leases on its own 10 ms tick; this is the safety sweep behind it.

It holds no state, so a crash is logged and the next message handled as usual ("restart" in
`actors.hub_actor`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pykka

from actors.dispatch import handles
from actors.envelopes import ExpireLeases
from actors.hub_actor import HubActor

if TYPE_CHECKING:
    from actors.queue import QueueActor


class LeaseWatcherActor(HubActor):
    crash_policy = "restart"

    def __init__(self, queue: pykka.ActorRef[QueueActor], interval_s: float) -> None:
        super().__init__()
        self.queue = queue
        self.interval_s = interval_s

    def on_start(self) -> None:
        self.every(self.interval_s, ExpireLeases())

    @handles(ExpireLeases)
    def _on_expire_leases(self, message: ExpireLeases) -> None:
        self.queue.tell(message)
