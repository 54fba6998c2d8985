"""One dispatch style for every actor: `@handles(MessageType)` on a method, one table per class.

    class RegistryActor(HubActor):
        @handles(WorkerSeen)
        def _on_seen(self, message: WorkerSeen) -> None: ...

`Dispatching.on_receive` looks the message's exact type up in the class's `handlers` table (one dict
lookup, no isinstance chain) and calls the method with the message; what it returns goes back to an
asker. A subclass inherits its bases' handlers and may replace one by handling the same type again.
A message of a type with no handler is dropped and logged once per actor class and type (a wiring
mistake, not something a client can cause), and an asker gets None.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

log = logging.getLogger("tqbroker.dispatch")

F = TypeVar("F", bound=Callable[..., Any])
_HANDLES = "__tq_handles__"  # the attribute `handles` sets on a method: the message types it takes


def handles(*message_types: type) -> Callable[[F], F]:
    """Marks a method `(self, message) -> reply` as the handler of each of `message_types`."""
    if not message_types:
        raise TypeError("handles() needs at least one message type")

    def mark(method: F) -> F:
        setattr(method, _HANDLES, (*getattr(method, _HANDLES, ()), *message_types))
        return method

    return mark


class Dispatching:
    """Mixin for a Pykka actor: `on_receive` dispatches by message type through `handlers`."""

    handlers: ClassVar[dict[type, Callable[[Any, Any], Any]]] = {}
    _unexpected: ClassVar[set[type]] = set()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = dict(cls.handlers)  # the bases' first, so a subclass's own handler replaces theirs
        for value in vars(cls).values():
            for message_type in getattr(value, _HANDLES, ()):
                table[message_type] = value
        cls.handlers = table
        cls._unexpected = set()

    def on_receive(self, message: Any) -> Any:
        handler = self.handlers.get(type(message))
        if handler is None:
            self.unexpected(message)
            return None
        return handler(self, message)

    def unexpected(self, message: Any) -> None:
        """A message no handler takes: logged once per class and type, then dropped."""
        kind = type(message)
        if kind not in self._unexpected:
            self._unexpected.add(kind)
            log.warning("%s ignored a message it has no handler for: %s", type(self).__name__, kind.__name__)
