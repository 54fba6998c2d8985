"""HubActor: a Pykka ThreadingActor whose inbox is gevent's C queue when threads are greenlets.

Pykka 4 has no gevent actor. Under `gevent.monkey.patch_all()` a ThreadingActor's thread is a
greenlet, but its inbox stays the pure-Python `queue.Queue`, whose every `put`/`get` runs
`threading.Condition` code on patched locks. `gevent.queue.SimpleQueue` (Cython) has the same
`put`/`get`/`empty` Pykka uses and is the natural primitive for greenlets; on figure a of the
benchmark (every request crosses an inbox) the difference was within the noise, so this is about
using the right primitive, not a measured speed-up. Without monkey patching (unit tests that start
actors on real threads) the stock inbox is kept, since a gevent queue cannot wake a real thread.
"""

from __future__ import annotations

from typing import Any

import gevent.queue
import pykka
from gevent import monkey


class HubActor(pykka.ThreadingActor):
    """Base of every broker actor."""

    @staticmethod
    def _create_actor_inbox() -> Any:
        if monkey.is_module_patched("threading"):
            return gevent.queue.SimpleQueue()
        return pykka.ThreadingActor._create_actor_inbox()
