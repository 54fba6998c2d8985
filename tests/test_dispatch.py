"""Actor message dispatch (`@handles`, actors.dispatch) and HubActor's periodic timers, on real threads."""

from __future__ import annotations

import logging
from typing import Any

import gevent
import pytest
from msgspec import Struct

from actors.dispatch import handles
from actors.hub_actor import HubActor, set_crash_listener
from tests.helpers import wait_for


class Ping(Struct, frozen=True):
    n: int


class Boom(Struct, frozen=True):
    pass


class Timers(Struct, frozen=True):
    pass


class _Echo(HubActor):
    @handles(Ping)
    def _on_ping(self, message: Ping) -> str:
        return f"ping {message.n}"


class _Louder(_Echo):
    @handles(Ping)
    def _on_ping_loudly(self, message: Ping) -> str:
        return f"PING {message.n}"

    @handles(Boom, Timers)
    def _on_other(self, message: Any) -> str:
        return type(message).__name__


class _Ticking(HubActor):
    crash_policy = "essential"

    def on_start(self) -> None:
        self.every(60.0, Ping(0))
        self.every(60.0, Ping(1))

    @handles(Timers)
    def _on_timers(self, _message: Timers) -> list[gevent.Greenlet]:
        return list(self._periodic)

    @handles(Boom)
    def _on_boom(self, _message: Boom) -> None:
        raise ValueError("boom")


def test_a_message_goes_to_the_method_that_handles_its_exact_type() -> None:
    ref = _Echo.start()
    try:
        assert ref.ask(Ping(3), timeout=5) == "ping 3"
    finally:
        ref.stop()


def test_a_subclass_inherits_its_bases_handlers_and_may_replace_one() -> None:
    assert _Echo.handlers == {Ping: _Echo._on_ping}
    assert _Louder.handlers == {Ping: _Louder._on_ping_loudly, Boom: _Louder._on_other, Timers: _Louder._on_other}
    ref = _Louder.start()
    try:
        assert ref.ask(Ping(4), timeout=5) == "PING 4"
        assert ref.ask(Boom(), timeout=5) == "Boom"
    finally:
        ref.stop()


def test_a_message_no_handler_takes_is_dropped_and_logged_once_per_type(caplog: pytest.LogCaptureFixture) -> None:
    ref = _Echo.start()
    try:
        with caplog.at_level(logging.WARNING, logger="tqbroker.dispatch"):
            assert ref.ask(Boom(), timeout=5) is None
            assert ref.ask(Boom(), timeout=5) is None
            assert ref.ask(Ping(1), timeout=5) == "ping 1"  # the actor goes on
        lines = [r.getMessage() for r in caplog.records if r.name == "tqbroker.dispatch"]
        assert lines == ["_Echo ignored a message it has no handler for: Boom"]
    finally:
        ref.stop()


def test_handles_without_a_message_type_is_refused_at_import() -> None:
    with pytest.raises(TypeError, match="at least one message type"):
        handles()


def test_an_actors_timers_end_when_it_stops() -> None:
    ref = _Ticking.start()
    timers = ref.ask(Timers(), timeout=5)
    assert len(timers) == 2 and not any(t.dead for t in timers)
    ref.stop()
    wait_for(lambda: all(t.dead for t in timers))


def test_an_essential_actors_timers_end_when_it_crashes_though_it_stays_alive() -> None:
    heard: list[str] = []
    set_crash_listener(heard.append)
    ref = _Ticking.start()
    try:
        timers = ref.ask(Timers(), timeout=5)
        ref.tell(Boom())
        wait_for(lambda: heard)
        wait_for(lambda: all(t.dead for t in timers))
        assert ref.is_alive()
    finally:
        set_crash_listener(None)
        ref.stop()
