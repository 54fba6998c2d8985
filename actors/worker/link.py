"""LinkActor: the one owner of the worker's broker connections and of its registration.

The worker keeps two connections: `claims` carries nothing but long-poll CLAIMs, `control` carries
HEARTBEATs, RESULTs, REGISTER and DEREGISTER, so a claim waiting 5 s never delays a heartbeat. Any actor
that sees a connection fail tells the link `Lost`; the link re-dials both with backoff (0.1 s doubling
to 5 s), REGISTERs again under the same worker id (the broker keeps running tasks across its restarts,
and a heartbeat under the old id renews their leases), and tells every listener `Connected` with a new
generation number. A `Lost` from an older generation is stale news and ignored, so several actors
noticing the same failure cause one re-dial.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import pykka
from msgspec import Struct

from actors.dispatch import Dispatching, handles
from transport.backoff import backoff_delay
from transport.client import Client
from transport.errors import BadRequest, BrokerError, ClientError, RequestTimeout, Unauthorized
from transport.messages import Deregister

log = logging.getLogger("tqbroker.worker")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class Registration(Struct):
    """What the worker tells REGISTER. `worker_id` is filled in by the link (the broker picks it first);
    the runner reads it only to DEREGISTER on a forced exit."""

    name: str
    hostname: str
    pid: int
    queues: list[str]
    concurrency: int
    metadata: dict[str, str]
    worker_id: str | None = None
    schedules: list[tuple[str, str, str, Any]] = []  # (name, cron, tz, TaskSpec) of @task(cron=...), stored at dial


class Connected(Struct, frozen=True):
    """Both connections are up and the worker is registered; work may (re)start."""

    generation: int
    worker_id: str
    heartbeat_interval_s: float
    max_batch_claim: int


class Lost(Struct, frozen=True):
    """A request on connection `source` ("claims" or "control") failed for lack of a connection."""

    generation: int
    source: str
    reason: str


class Listen(Struct):
    """Wiring: who hears `Connected`. The first dial starts when this arrives."""

    listeners: list[Any]


class Heard(Struct, frozen=True):
    """The broker answered something: resets the inactivity clock."""


class Stopping(Struct, frozen=True):
    """Graceful shutdown began: the claims connection is being closed on purpose, keep only control."""


class DeregisterNow(Struct, frozen=True):
    """DEREGISTER (asked, answers True when the broker acknowledged it)."""

    timeout_s: float


class _Dial(Struct, frozen=True):
    pass


class _CheckInactivity(Struct, frozen=True):
    pass


def tell_quietly(ref: Any, message: Any) -> None:
    """`ref.tell(message)` from timers and task greenlets, which may outlive the actor at shutdown."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


class LinkActor(Dispatching, pykka.ThreadingActor):
    def __init__(self, control: Client, claims: Client, registration: Registration, max_inactivity_s: float,
                 on_fatal: Callable[[str], None]) -> None:
        super().__init__()
        self.control = control
        self.claims = claims
        self.registration = registration
        self.max_inactivity_s = max_inactivity_s
        self.on_fatal = on_fatal
        self.listeners: list[Any] = []
        self.generation = 0
        self.connected = False
        self.stopping = False
        self.failed_dials = 0
        self.last_heard = time.monotonic()
        self.warned_at = self.last_heard
        self.heartbeat_interval_s = 0.0
        self._dial_timer: gevent.Greenlet | None = None
        self._inactivity_timer: gevent.Greenlet | None = None

    def on_start(self) -> None:
        self._inactivity_timer = gevent.spawn(self._inactivity_loop)

    def on_stop(self) -> None:
        for timer in (self._dial_timer, self._inactivity_timer):
            if timer is not None:
                timer.kill(block=False)

    def _inactivity_loop(self) -> None:
        period = max(0.1, min(self.max_inactivity_s / 4, 5.0))
        while True:
            gevent.sleep(period)
            tell_quietly(self.actor_ref, _CheckInactivity())

    @handles(Heard)
    def _on_heard(self, _message: Heard) -> None:
        self.last_heard = time.monotonic()

    @handles(_Dial)
    def _on_dial(self, _message: _Dial) -> None:
        self._dial_timer = None
        self._dial()

    @handles(_CheckInactivity)
    def _on_check_inactivity(self, _message: _CheckInactivity) -> None:
        self._check_inactivity()

    @handles(Listen)
    def _on_listen(self, message: Listen) -> None:
        self.listeners = list(message.listeners)
        self._dial()

    @handles(Stopping)
    def _on_stopping(self, _message: Stopping) -> None:
        self.stopping = True

    @handles(DeregisterNow)
    def _on_deregister_now(self, message: DeregisterNow) -> bool:
        return self._deregister(message.timeout_s)

    @handles(Lost)
    def _on_lost(self, msg: Lost) -> None:
        if msg.generation != self.generation or not self.connected:
            return  # stale: this failure was already handled, or a re-dial is under way
        if self.stopping and msg.source == "claims":
            return  # closed on purpose to end the waiting CLAIM
        self.connected = False
        log.warning("lost the broker connection (%s); reconnecting", msg.reason,
                    extra={"worker_id": self.registration.worker_id})
        self.failed_dials = 0
        self._schedule_dial()

    def _schedule_dial(self) -> None:
        if self._dial_timer is None:
            self.failed_dials += 1
            delay_s = backoff_delay(self.failed_dials, BACKOFF_FIRST_S, BACKOFF_MAX_S)
            self._dial_timer = gevent.spawn_later(delay_s, tell_quietly, self.actor_ref, _Dial())

    def _store_schedules(self) -> None:
        """SCHEDULE_ADD for each @task(cron=...): idempotent (same cron keeps its place), so every dial may."""
        for name, cron, tz, spec in self.registration.schedules:
            try:
                self.control.schedule_add(name, cron, spec, tz=tz)
            except (ClientError, BrokerError, RequestTimeout) as exc:
                log.error("could not store the schedule of %s (%s): %s", name, cron, exc)

    def _dial(self) -> None:
        """Connect both clients and REGISTER; on failure try again after the backoff."""
        if self.connected:
            return
        reg = self.registration
        try:
            welcome = self.control.reconnect()
            if not self.stopping:
                self.claims.reconnect()
            worker_id = self.control.register(
                reg.worker_id, name=reg.name, hostname=reg.hostname, pid=reg.pid, queues=reg.queues,
                concurrency=reg.concurrency, metadata=reg.metadata,
            )
        except Unauthorized as exc:
            log.error("the broker refused this worker: %s (check --api-key / TQ_API_KEY)", exc)
            self.on_fatal(f"unauthorized: {exc.message}")
            return
        except BadRequest as exc:  # a REGISTER the broker will never accept: retrying cannot help
            log.error("the broker refused the registration: %s", exc)
            self.on_fatal(f"registration refused: {exc.message}")
            return
        except (ClientError, BrokerError, RequestTimeout) as exc:
            log.info("broker not reachable at %s (%s); next try in %.1f s", self.control.address, exc,
                     backoff_delay(self.failed_dials + 1, BACKOFF_FIRST_S, BACKOFF_MAX_S))
            self._schedule_dial()
            return
        self._store_schedules()
        first = reg.worker_id is None
        reg.worker_id = worker_id
        self.generation += 1
        self.connected = True
        self.failed_dials = 0
        self.last_heard = self.warned_at = time.monotonic()
        interval_s = self.heartbeat_interval_s = welcome.heartbeat_interval_ms / 1000.0
        log.info("worker %s as %s at %s (queues %s, heartbeat every %.2f s)",
                 "registered" if first else "re-registered", worker_id, self.control.address,
                 ",".join(reg.queues), interval_s, extra={"worker_id": worker_id})
        news = Connected(generation=self.generation, worker_id=worker_id, heartbeat_interval_s=interval_s,
                         max_batch_claim=welcome.max_batch_claim)
        for listener in self.listeners:
            tell_quietly(listener, news)

    def _check_inactivity(self) -> None:
        """Warn (once per limit) when the broker has not answered for `max_inactivity_s`. While connected
        a healthy worker is heard from only once per heartbeat interval, so then the limit is at least two
        intervals; while disconnected every second of silence is real."""
        now = time.monotonic()
        silent = now - self.last_heard
        limit = self.max_inactivity_s
        if self.connected:
            limit = max(limit, 2 * self.heartbeat_interval_s)
        if silent >= limit and now - self.warned_at >= limit:
            self.warned_at = now
            log.warning("nothing heard from the broker at %s for %.0f s (worker.max_inactivity_secs); "
                        "still trying", self.control.address, silent,
                        extra={"worker_id": self.registration.worker_id})

    def _deregister(self, timeout_s: float) -> bool:
        worker_id = self.registration.worker_id
        if worker_id is None or not self.connected:
            log.warning("not connected: could not DEREGISTER; the broker reclaims this worker's tasks once "
                        "its heartbeats stop", extra={"worker_id": worker_id})
            return False
        try:
            self.control.send_async(Deregister(id=0, worker_id=worker_id), timeout=timeout_s).get()
        except (ClientError, BrokerError, RequestTimeout) as exc:
            log.warning("DEREGISTER failed: %s", exc, extra={"worker_id": worker_id})
            return False
        log.info("worker deregistered", extra={"worker_id": worker_id})
        return True
