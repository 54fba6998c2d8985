"""The producer-side SDK: `@task` turns a function into a task kind that can be submitted and awaited.

```python
from actors.worker import task

@task(queue="emails", priority="high", max_retries=5)
def send_email(to: str, body: str) -> str: ...

handle = send_email.submit("a@example.com", "hi")      # SUBMIT; also run_at=, delay=, unique_key=
handle.result(timeout=10)                              # polls STATUS; raises TaskFailed, TaskCancelled...
send_email.submit_many([("a", "b"), ("c", "d")])       # one SUBMIT_BATCH per 10,000 calls
send_email("x", "y")                                   # still an ordinary local call
```

Wire format, so producers and workers in other languages interoperate (docs/protocol.md leaves `payload` and
`result` opaque; this is the convention of the Python SDK and worker runtime):

- `kind` is `"<module>.<qualname>"` of the function (e.g. `billing.tasks.send_email`) unless `name=` is given.
- `payload` is a MessagePack map `{"args": [...], "kwargs": {str: ...}}`; both keys may be left out, and
  an empty payload means no arguments.
- `result` is the MessagePack encoding of the return value (empty means None). Values decode to plain
  MessagePack types: tuples come back as lists, and a value msgspec cannot encode fails the task.

Why a process-wide default connection: `send_email.submit(...)` must work without threading a client
through application code. It is made lazily from `TQ_BROKER__HOST` / `TQ_BROKER__PORT` / `TQ_API_KEY`
(127.0.0.1:6379 by default), or set explicitly with `connect()`. Only requests that may safely be sent
twice (STATUS) are retried after a dropped connection; a dead connection is re-dialed *before* a SUBMIT
is sent, never after it was sent.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar, overload

import msgspec

from actors.worker.exceptions import Reject, Retry, TaskCancelled, TaskFailed
from storage.model import TaskState
from transport import messages as m
from transport.backoff import backoff_delay
from transport.client import Client
from transport.client_settings import ClientSettings
from transport.errors import ClientError, ConnectionLost, Unavailable

__all__ = [
    "Reject",
    "Retry",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskHandle",
    "connect",
    "decode_payload",
    "decode_result",
    "encode_payload",
    "encode_result",
    "get_client",
    "registered_tasks",
    "task",
]

log = logging.getLogger("tqbroker.worker")

P = ParamSpec("P")
R = TypeVar("R")

MAX_BATCH = 10_000  # docs/protocol.md: SUBMIT_BATCH carries 1–10,000 tasks
POLL_FIRST_S = 0.01
POLL_MAX_S = 0.5


# ---------------------------------------------------------------- encoding


class Payload(msgspec.Struct, omit_defaults=True):
    """The documented payload map; both keys optional so other producers may leave them out."""

    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)


_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(Payload)


def encode_payload(args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None) -> bytes:
    """`{"args": [...], "kwargs": {...}}` as MessagePack; raises TypeError for unencodable arguments."""
    try:
        return _encoder.encode({"args": list(args), "kwargs": dict(kwargs or {})})
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"task arguments are not MessagePack-encodable: {exc}") from None


def decode_payload(payload: bytes) -> tuple[list[Any], dict[str, Any]]:
    """The args and kwargs of a payload; raises ValueError naming what is wrong with a foreign one."""
    if not payload:
        return [], {}
    try:
        decoded = _payload_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        shape = '{"args": [...], "kwargs": {...}}'
        raise ValueError(f"payload is not a MessagePack map {shape}: {exc}") from None
    return decoded.args, decoded.kwargs


def encode_result(value: Any) -> bytes:
    """A return value as MessagePack; raises TypeError when msgspec cannot encode it."""
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"return value is not MessagePack-encodable: {exc}") from None


def decode_result(result: bytes | None) -> Any:
    """A task's result bytes back into Python values (empty or missing means None)."""
    return msgspec.msgpack.decode(result) if result else None


# ---------------------------------------------------------------- the default connection

_default_client: Client | None = None
_default_lock = threading.Lock()


def connect(host: str | None = None, port: int | None = None, api_key: str | None = None,
            tls: bool | None = None, ca_file: str | None = None, **client_options: Any) -> Client:
    """Dial the broker and make it the process-wide default connection (closing the previous one).

    Unset arguments are resolved by `transport.client_settings.ClientSettings` (TQ_BROKER__HOST,
    TQ_BROKER__PORT, TQ_API_KEY, TQ_TLS_CA); `client_options` go to `transport.client.Client`
    (timeout, client_name).
    """
    global _default_client
    client_options.setdefault("client_name", "tqbroker-python-sdk")
    settings = ClientSettings.resolve(host, port, api_key, tls, ca_file)
    client = settings.client(**client_options)
    with _default_lock:
        previous, _default_client = _default_client, client
    if previous is not None:
        previous.close()
    return client


def get_client() -> Client:
    """The default connection, dialed on first use and re-dialed if it dropped since the last request."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = ClientSettings.resolve().client(client_name="tqbroker-python-sdk")
        elif not _default_client.connected:
            _default_client.reconnect()
        return _default_client


def _live(client: Client | None) -> Client:
    """`client` made usable (re-dialed if it dropped: nothing was sent on it yet), or the default."""
    if client is None:
        return get_client()
    if not client.connected:
        client.reconnect()
    return client


# ---------------------------------------------------------------- handles


class TaskHandle:
    """A submitted task: its id plus STATUS, CANCEL and a polling `result()`.

    `TaskHandle(task_id)` also works for ids obtained elsewhere (another process, the CLI).
    """

    __slots__ = ("task_id", "duplicate", "_client")

    def __init__(self, task_id: str, client: Client | None = None, duplicate: bool = False) -> None:
        self.task_id = task_id
        self.duplicate = duplicate  # True when a unique_key matched a live task and nothing was added
        self._client = client  # None: whatever the process-wide default is at call time

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.task_id == self.task_id

    def __hash__(self) -> int:
        return hash(self.task_id)

    def status(self) -> m.TaskInfo:
        """The broker's TaskInfo (state, attempts, error, ...). STATUS is idempotent, so a dropped
        connection is re-dialed and the request sent once more."""
        try:
            return _live(self._client).status(self.task_id)
        except ConnectionLost:
            return _live(self._client).status(self.task_id)

    def cancel(self) -> None:
        """Cancel a pending or scheduled task; raises InvalidState once it runs or ended."""
        _live(self._client).cancel(self.task_id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task to end and return its decoded return value.

        Polls STATUS, starting at 10 ms and doubling to 0.5 s, so short tasks answer quickly and long
        ones cost two requests a second. Raises TaskFailed (with the worker's error text), TaskCancelled,
        or TimeoutError once `timeout` seconds passed (None waits for ever). A broker that is briefly
        unreachable (a restart), or answers UNAVAILABLE (its history cannot be read just now), is polled
        again until the deadline.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        polls = 0
        last_error: ClientError | Unavailable | None = None
        while True:
            try:
                info = self.status()
                last_error = None
            except (ClientError, Unavailable) as exc:  # Unavailable: history unreadable for now
                info, last_error = None, exc
            if info is not None and info.state in TaskState.TERMINAL:
                return _outcome(info)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                state = info.state if info is not None else "unknown"
                raise TimeoutError(f"task {self.task_id} did not finish within {timeout:g} s "
                                   f"(state {state})") from last_error
            polls += 1
            interval = backoff_delay(polls, POLL_FIRST_S, POLL_MAX_S)
            time.sleep(interval if remaining is None else min(interval, remaining))


def _outcome(info: m.TaskInfo) -> Any:
    if info.state == "completed":
        return decode_result(info.result)
    if info.state == "cancelled":
        raise TaskCancelled(info.task_id)
    raise TaskFailed(info.task_id, info.error or "(no error text)", info)


# ---------------------------------------------------------------- the decorator

_task_kinds: dict[str, Task[Any, Any]] = {}
_task_kinds_lock = threading.Lock()


def registered_tasks() -> dict[str, Task[Any, Any]]:
    """Every `@task` defined (imported) in this process, by kind: what a worker can serve."""
    with _task_kinds_lock:
        return dict(_task_kinds)


def _timestamp(run_at: float | dt.datetime | None, delay: float | None) -> float | None:
    if run_at is not None and delay is not None:
        raise ValueError("give run_at or delay, not both")
    if delay is not None:
        return time.time() + delay
    if isinstance(run_at, dt.datetime):
        return run_at.timestamp()  # a naive datetime is local time, as everywhere in Python
    return run_at


class Task(Generic[P, R]):
    """A function registered as a task kind. Calling it runs it here; `submit` sends it to the broker."""

    __qualname__: str  # the wrapped function's, copied by functools.update_wrapper (pickling uses it)

    def __init__(self, fn: Callable[P, R], *, name: str | None = None, queue: str = "default",
                 priority: int | m.PriorityName = "normal", max_retries: int | None = None,
                 lease_ms: int | None = None, cron: str | None = None, cron_tz: str = "UTC") -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.kind = name if name is not None else f"{fn.__module__}.{fn.__qualname__}"
        self.queue = queue
        self.priority = priority
        self.max_retries = max_retries
        self.lease_ms = lease_ms
        try:  # validate once, here, with the protocol's own constraints, so submit never gets BAD_REQUEST
            msgspec.convert({"kind": self.kind, "queue": queue, "priority": priority,
                             "max_retries": max_retries, "lease_ms": lease_ms}, m.TaskSpec)
        except msgspec.ValidationError as exc:
            raise ValueError(f"@task {self.kind}: {exc}") from None
        self.cron, self.cron_tz = cron, cron_tz  # a worker serving this kind registers the schedule at start
        if cron is not None:
            _check_cron(self.kind, cron, cron_tz)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.kind} queue={self.queue}>"

    def __reduce__(self) -> str:
        """Pickled by reference (module + qualname), like the function it replaces in its module."""
        return self.__qualname__

    def spec(self, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, *,
             run_at: float | dt.datetime | None = None, delay: float | None = None,
             unique_key: str | None = None, priority: int | m.PriorityName | None = None) -> m.TaskSpec:
        """The TaskSpec that submitting this call sends (useful to batch several kinds by hand)."""
        return m.TaskSpec(kind=self.kind, payload=encode_payload(args, kwargs), queue=self.queue,
                          priority=self.priority if priority is None else priority,
                          run_at=_timestamp(run_at, delay), max_retries=self.max_retries,
                          lease_ms=self.lease_ms, unique_key=unique_key)

    def submit(self, *args: Any, run_at: float | dt.datetime | None = None, delay: float | None = None,
               unique_key: str | None = None, **kwargs: Any) -> TaskHandle:
        """Submit one call; `run_at` (unix seconds or datetime) or `delay` (seconds) schedules it.

        `run_at`, `delay` and `unique_key` are options, not task arguments: a function with parameters
        of those names is submitted with `apply(args, kwargs, ...)` instead.
        """
        return self.apply(args, kwargs, run_at=run_at, delay=delay, unique_key=unique_key)

    def apply(self, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, *,
              run_at: float | dt.datetime | None = None, delay: float | None = None,
              unique_key: str | None = None, priority: int | m.PriorityName | None = None,
              client: Client | None = None) -> TaskHandle:
        """Submit one call with explicit args/kwargs (and optionally another priority or client)."""
        spec = self.spec(args, kwargs, run_at=run_at, delay=delay, unique_key=unique_key, priority=priority)
        live = _live(client)
        reply = live.request(m.Submit(id=0, task=spec))
        assert isinstance(reply, m.Submitted)
        return TaskHandle(reply.task_id, client, reply.duplicate)

    def submit_many(self, calls: Iterable[Any], *, run_at: float | dt.datetime | None = None,
                    delay: float | None = None, client: Client | None = None) -> list[TaskHandle]:
        """Submit many calls with one SUBMIT_BATCH per 10,000 (each batch accepted whole or not at all).

        Each item is an args tuple `("a", "b")`, an `(args, kwargs)` pair `(("a",), {"body": "b"})`
        (a 2-tuple of a tuple/list and a dict), or any other value as the single argument.
        """
        when = _timestamp(run_at, delay)
        specs = [self.spec(*_split_call(call), run_at=when) for call in calls]
        live = _live(client)
        handles: list[TaskHandle] = []
        for start in range(0, len(specs), MAX_BATCH):
            ids = live.submit_batch(specs[start:start + MAX_BATCH])
            handles.extend(TaskHandle(task_id, client) for task_id in ids)
        return handles


def _split_call(call: Any) -> tuple[tuple[Any, ...] | list[Any], dict[str, Any] | None]:
    if isinstance(call, tuple):
        if len(call) == 2 and isinstance(call[0], (tuple, list)) and isinstance(call[1], dict):
            return call[0], call[1]
        return call, None
    return (call,), None


def _register(t: Task[Any, Any]) -> None:
    with _task_kinds_lock:
        existing = _task_kinds.get(t.kind)
        if existing is not None and (existing.__module__, existing.__qualname__) != (t.__module__, t.__qualname__):
            raise ValueError(f"task kind {t.kind!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}; give one of them another name=")
        _task_kinds[t.kind] = t  # a module imported again (reload) replaces its own tasks


def _check_cron(kind: str, cron: str, tz: str) -> None:
    from actors.cron import CronError, check  # cronsim only when a schedule is used

    try:
        check(cron, tz)
    except CronError as exc:
        raise ValueError(f"@task {kind}: {exc}") from None


def schedule(name: str, cron: str, task: Task[Any, Any], *args: Any, tz: str = "UTC",
             client: Client | None = None, **kwargs: Any) -> None:
    """Stores (or replaces) the broker's cron schedule `name`: `task(*args, **kwargs)` is submitted once per
    fire time of `cron` (5 fields) in time zone `tz`. Replacing it with the same cron and zone keeps its
    place, so running this at every start never fires twice for one time."""
    _live(client).schedule_add(name, cron, task.spec(args, kwargs), tz=tz)


def cron_schedules(kinds: dict[str, Task[Any, Any]]) -> list[tuple[str, str, str, m.TaskSpec]]:
    """(name, cron, tz, spec) of every `@task(cron=...)` among `kinds`; the worker registers them."""
    return [(t.kind, t.cron, t.cron_tz, t.spec()) for t in kinds.values() if t.cron is not None]


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *, name: str | None = None, queue: str = "default", priority: int | m.PriorityName = "normal",
    max_retries: int | None = None, lease_ms: int | None = None, cron: str | None = None, cron_tz: str = "UTC",
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(fn: Callable[P, R] | None = None, /, *, name: str | None = None, queue: str = "default",
         priority: int | m.PriorityName = "normal", max_retries: int | None = None,
         lease_ms: int | None = None, cron: str | None = None,
         cron_tz: str = "UTC") -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Register a function as a task kind; usable bare (`@task`) or with options (`@task(queue=...)`).

    `cron` ("*/5 * * * *", in time zone `cron_tz`): a worker serving this kind stores a broker schedule
    named after the kind at start (and on every reconnect), which submits the task without arguments.

    `max_retries` and `lease_ms` left as None take the broker's defaults (broker.default_max_retries,
    broker.worker_lease_timeout_secs). Options are validated here, against the protocol's limits.
    """

    def wrap(f: Callable[P, R]) -> Task[P, R]:
        t = Task(f, name=name, queue=queue, priority=priority, max_retries=max_retries, lease_ms=lease_ms,
                 cron=cron, cron_tz=cron_tz)
        _register(t)
        return t

    return wrap(fn) if fn is not None else wrap
