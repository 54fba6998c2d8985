"""HeartbeatActor: tells the broker this worker is alive, what it costs, and which tasks it holds.

Each HEARTBEAT renews the lease of every task in its `active` list, so it is what keeps a long task from
being handed to another worker. The active list is fed by the executor (`Started`) and emptied by the
reporter (`Settled`, once the task's RESULT was acknowledged or refused), never read from their state.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import psutil
import pykka

from actors.dispatch import Dispatching, handles
from actors.worker.link import Connected, Heard, Lost, tell_quietly
from actors.worker.messages import Settled, Started, Stop
from transport.client import Client
from transport.errors import BrokerError, ClientError, RequestTimeout

log = logging.getLogger("tqbroker.worker")

MIN_BEAT_S = 0.05


class _Beat:
    """Time for the next HEARTBEAT (told by the actor's own timer)."""


class HeartbeatActor(Dispatching, pykka.ThreadingActor):
    """HEARTBEAT with CPU %, RSS and the active task ids (renewing their leases) on the control connection.

    The period is the broker's (WELCOME heartbeat_interval_ms, or the worker's own setting if shorter),
    and shorter still while a task with a short `lease_ms` runs: a third of that lease, so a lease
    shorter than the heartbeat interval is still renewed in time.
    """

    def __init__(self, control: Client, link: Any, interval_s: float, with_children: bool) -> None:
        super().__init__()
        self.control = control
        self.with_children = with_children
        self.link = link
        self.local_interval_s = interval_s
        self.interval_s = interval_s
        self.active: dict[str, float | None] = {}  # task id -> its lease in seconds, if known
        self.generation = 0
        self.worker_id = ""
        self.connected = False
        self.stopped = False
        self.next_at = float("inf")
        self._timer: gevent.Greenlet | None = None
        self.process = psutil.Process()
        self.children: dict[int, psutil.Process] = {}
        self.process.cpu_percent(None)  # the first reading only starts the measurement

    def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)

    @handles(_Beat)
    def _on_beat(self, _message: _Beat) -> None:
        self._beat()

    @handles(Started)
    def _on_started(self, message: Started) -> None:
        self.active[message.task_id] = message.lease_s
        if time.monotonic() + self._period() < self.next_at:
            self._schedule()

    @handles(Settled)
    def _on_settled(self, message: Settled) -> None:
        for task_id in message.task_ids:
            self.active.pop(task_id, None)

    @handles(Connected)
    def _on_connected(self, message: Connected) -> None:
        self.generation, self.worker_id, self.connected = message.generation, message.worker_id, True
        self.interval_s = min(self.local_interval_s, message.heartbeat_interval_s)
        self._beat()  # at once: renews the leases of tasks that ran on while we were away

    @handles(Stop)
    def _on_stop(self, _message: Stop) -> None:
        self.stopped = True

    def _period(self) -> float:
        leases = [lease / 3 for lease in self.active.values() if lease]
        return max(MIN_BEAT_S, min([self.interval_s, *leases]))

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)
        period = self._period()
        self.next_at = time.monotonic() + period
        self._timer = gevent.spawn_later(period, tell_quietly, self.actor_ref, _Beat())

    def _usage(self) -> tuple[float | None, int | None]:
        """CPU % and RSS of the worker plus, with a process pool, its children (each Process object is
        kept, because psutil measures CPU % between two calls on the same object).

        Children are looked up only with a process pool: finding them scans all of /proc, which beside a
        CPU-bound task thread delays the heartbeat (see docs/performance.md#worker-heartbeat-usage-figures).
        """
        try:
            cpu, rss = self.process.cpu_percent(None), self.process.memory_info().rss
            if not self.with_children:
                return round(cpu, 1), rss
            live = {}
            for child in self.process.children(recursive=True):
                proc = self.children.get(child.pid, child)
                try:
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
                    live[child.pid] = proc
                except psutil.Error:
                    pass
            self.children = live
            return round(cpu, 1), rss
        except psutil.Error:
            return None, None

    def _beat(self) -> None:
        if self.stopped or not self.connected:
            return
        cpu, rss = self._usage()
        try:
            self.control.heartbeat(self.worker_id, list(self.active), cpu, rss)
        except ClientError as exc:
            self.connected = False
            self.link.tell(Lost(generation=self.generation, source="control", reason=str(exc)))
            return
        except (RequestTimeout, BrokerError) as exc:
            log.warning("HEARTBEAT failed: %s", exc, extra={"worker_id": self.worker_id})
        else:
            self.link.tell(Heard())
        self._schedule()
