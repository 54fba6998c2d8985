"""Periodic timers that turn time into actor messages, so actors never sleep in a handler."""

from __future__ import annotations

from typing import Any

import gevent
import pykka


def every(interval_s: float, ref: Any, message: object) -> gevent.Greenlet:
    """Tells `message` to `ref` every `interval_s` seconds until the actor stops or the greenlet is killed."""

    def loop() -> None:
        while True:
            gevent.sleep(interval_s)
            try:
                ref.tell(message)
            except pykka.ActorDeadError:
                return

    return gevent.spawn(loop)
