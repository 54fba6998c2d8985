"""HubActor: a Pykka ThreadingActor whose inbox is gevent's C queue when threads are greenlets.

Pykka 4 has no gevent actor. Under `gevent.monkey.patch_all()` a ThreadingActor's thread is a
greenlet, but its inbox stays the pure-Python `queue.Queue`, whose every `put`/`get` runs
`threading.Condition` code on patched locks. `gevent.queue.SimpleQueue` (Cython) has the same
`put`/`get`/`empty` Pykka uses and is the natural primitive for greenlets; on figure a of the
benchmark (every request crosses an inbox) the difference was within the noise, so this is about
using the right primitive, not a measured speed-up. Without monkey patching (unit tests that start
actors on real threads) the stock inbox is kept, since a gevent queue cannot wake a real thread.

Supervision: an exception escaping a handler (`on_receive`, or a proxy call) is a crash. What it means
is each actor's `crash_policy`:

- "essential" (queue actor, worker registry, compactor): its state may be half-changed, so it is never
  used again. One CRITICAL line names the actor, the message type and the traceback; `on_crash`
  answers what the crashing message and the actor's waiting requests expect (errors, never the
  crashing message's own replies); the listener set with `set_crash_listener` (the broker system) is
  told, marks the broker not ready and stops the process with exit status 70. The actor stays alive
  until then, answering every later message through `after_crash` (requests get SHUTTING_DOWN, asks
  raise), so no client hangs on it.
- "restart" (the lease watcher: it holds no state): one ERROR line, then the next message is handled
  as usual.
- "stop" (a connection's actor, the default): one ERROR line, `on_crash` (closing what it owns), then
  the actor stops; later messages are dropped as `after_crash` says.

`expected_errors` are raised to the asker without being a crash (the handler changed nothing first).
This relies on Pykka's `_handle_receive` and `_handle_failure` (private, unchanged since Pykka 1);
tests/test_supervision.py fails if they change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, Literal

import gevent
import gevent.queue
import pykka
from gevent import monkey
from pykka import messages as pykka_messages

from actors import timers
from actors.dispatch import Dispatching

log = logging.getLogger("tqbroker.supervision")

CrashPolicy = Literal["essential", "restart", "stop"]
TEST_HOOKS = os.environ.get("TQ_TEST_HOOKS") == "1"  # test-only fault injection, read once at start
CRASH_KIND = "tq.test.crash"  # with TEST_HOOKS: a task of this kind, or a REGISTER of this name, makes the
#                               queue actor's or the registry's handler raise

_listener: list[Callable[[str], None]] = []


def set_crash_listener(listener: Callable[[str], None] | None) -> None:
    """Who hears of an essential actor's crash (with its reason); the broker system sets itself."""
    _listener[:] = [listener] if listener is not None else []


def injected_crash(kind: str) -> None:
    """Raises when test hooks are on and `kind` (a task kind, a worker name) is CRASH_KIND: a handler
    failing mid-message."""
    if TEST_HOOKS and kind == CRASH_KIND:
        raise RuntimeError(f"crash injected by a test (TQ_TEST_HOOKS=1, task kind {CRASH_KIND})")


_pykka_receive = pykka.ThreadingActor._handle_receive  # bound once: no super() on every message


class ActorCrashed(Exception):
    """Raised to an asker of an actor that crashed; already logged, it does not stop the actor."""


class HubActor(Dispatching, pykka.ThreadingActor):
    """Base of every broker actor; messages are dispatched by type (`@handles`, actors.dispatch)."""

    crash_policy: ClassVar[CrashPolicy] = "stop"
    expected_errors: ClassVar[tuple[type[Exception], ...]] = ()  # raised to the asker, state unchanged: no crash
    crashed: str | None = None  # why this actor crashed, once it has

    def __init__(self) -> None:
        super().__init__()
        self._periodic: list[gevent.Greenlet] = []

    def every(self, interval_s: float, message: object) -> None:
        """Tells `message` to this actor every `interval_s` seconds (call it from `on_start`). The timer
        ends when the actor stops, and when it crashes unless its policy is "restart"."""
        self._periodic.append(timers.every(interval_s, self.actor_ref, message))

    def stop_timers(self) -> None:
        """Ends every timer started with `every`; idempotent."""
        periodic, self._periodic = self._periodic, []
        for timer in periodic:
            timer.kill(block=False)

    def _stop(self) -> None:
        """Pykka's stop (on a stop message or a failure), after ending this actor's timers."""
        self.stop_timers()
        super()._stop()

    @staticmethod
    def _create_actor_inbox() -> Any:
        if monkey.is_module_patched("threading"):
            return gevent.queue.SimpleQueue()
        return pykka.ThreadingActor._create_actor_inbox()

    def _handle_receive(self, message: Any) -> Any:
        """Pykka's dispatch of every message, with a crash turned into the actor's policy."""
        if self.crashed is not None:
            return self.after_crash(message)
        try:
            return _pykka_receive(self, message)
        except self.expected_errors:
            raise
        except Exception as exc:
            raise ActorCrashed(self._crash(message, exc)) from None  # to an asker; a tell: _handle_failure

    def _crash(self, message: Any, exc: Exception) -> str:
        """Logs the crash and applies the actor's policy; returns the reason."""
        name = type(self).__name__
        what = (".".join(message.attr_path) if isinstance(message, pykka_messages.ProxyCall)
                else type(message).__name__)
        reason = f"{name} crashed handling {what}: {type(exc).__name__}: {exc}"
        essential = self.crash_policy == "essential"
        log.log(logging.CRITICAL if essential else logging.ERROR, "%s", reason, exc_info=exc,
                extra={"actor": name, "message_type": what})
        if self.crash_policy == "restart":
            return reason
        self.crashed = reason
        self.stop_timers()
        try:
            self.on_crash(message)
        except Exception:
            log.exception("%s: answering after the crash failed too", name)
        if essential:
            for listener in _listener:
                listener(reason)
        else:
            self.actor_ref.stop(block=False)
        return reason

    def _handle_failure(self, exception_type: type[BaseException] | None, exception_value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if isinstance(exception_value, ActorCrashed):
            return  # already logged and handled by _crash; the actor's policy decides whether it stops
        super()._handle_failure(exception_type, exception_value, traceback)

    def on_crash(self, message: Any) -> None:
        """Answers what the crashing `message` and the actor's waiting requests expect (errors)."""

    def after_crash(self, message: Any) -> Any:
        """A message for a crashed actor: asks get ActorCrashed; subclasses answer their requests."""
        if isinstance(message, pykka_messages._ActorStop):  # noqa: SLF001 - a stop must still stop it
            return super()._handle_receive(message)
        raise ActorCrashed(self.crashed)
