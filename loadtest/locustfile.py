"""Locust load test of a running broker: producers SUBMIT / SUBMIT_BATCH, workers CLAIM → RESULT.

    make run   # in one terminal
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s --host 127.0.0.1:6379

Every request is reported to Locust through `environment.events.request` (request_type SUBMIT,
SUBMIT_BATCH, CLAIM, RESULT; response_time in ms; response_length in bytes of task payload moved; the
exception when the broker or the connection failed it). The client is the project's Python client: under
Locust's gevent monkey patching its reader thread is a greenlet and its socket a gevent socket, so one
Locust process drives many connections without blocking its hub.

Load shape, from Locust custom arguments or, as their defaults, environment variables:
  --payload-bytes / TQ_LOAD_PAYLOAD_BYTES   payload size of each task (default 100)
  --batch / TQ_LOAD_BATCH                   tasks per SUBMIT_BATCH; 0 sends only single SUBMITs (default 10)
  --priorities / TQ_LOAD_PRIORITIES         priority mix, e.g. "high:1,normal:8,low:1" or "255,150:3"
                                            (default "normal")
  --queue / TQ_LOAD_QUEUE                   queue to submit to and claim from (default "default")
  --claim-max / TQ_LOAD_CLAIM_MAX           max_tasks of each CLAIM (default 10)
"""

from __future__ import annotations

import os
import random
import time
import uuid
from typing import Any

from locust import User, events, task
from locust.env import Environment

from transport import messages as m
from transport.client import Client
from transport.errors import BrokerError, ClientError, QueueFull, RequestTimeout

DEFAULT_PORT = 6379
CLAIM_WAIT_MS = 1000
BACKOFF_S = 0.1  # after QUEUE_FULL or a connection failure


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    env = os.environ.get
    parser.add_argument("--payload-bytes", type=int, default=int(env("TQ_LOAD_PAYLOAD_BYTES", "100")),
                        help="payload size of each submitted task (TQ_LOAD_PAYLOAD_BYTES)")
    parser.add_argument("--batch", type=int, default=int(env("TQ_LOAD_BATCH", "10")),
                        help="tasks per SUBMIT_BATCH, 0 for single SUBMITs only (TQ_LOAD_BATCH)")
    parser.add_argument("--priorities", default=env("TQ_LOAD_PRIORITIES", "normal"),
                        help='priority mix such as "high:1,normal:8,low:1" (TQ_LOAD_PRIORITIES)')
    parser.add_argument("--queue", default=env("TQ_LOAD_QUEUE", "default"), help="queue name (TQ_LOAD_QUEUE)")
    parser.add_argument("--claim-max", type=int, default=int(env("TQ_LOAD_CLAIM_MAX", "10")),
                        help="max_tasks of each CLAIM (TQ_LOAD_CLAIM_MAX)")


def parse_host(host: str | None) -> tuple[str, int]:
    """`127.0.0.1:6379`, `tq://127.0.0.1:6379` or `127.0.0.1` → (host, port)."""
    if not host:
        raise ValueError("give the broker as --host HOST:PORT, e.g. --host 127.0.0.1:6379")
    text = host.split("://", 1)[-1].rstrip("/")
    if text.startswith("["):  # [::1]:6379
        addr, _, port = text[1:].partition("]")
        return addr, int(port.lstrip(":") or DEFAULT_PORT)
    addr, sep, port = text.rpartition(":")
    return (addr, int(port)) if sep else (text, DEFAULT_PORT)


def parse_priorities(text: str) -> tuple[list[int | str], list[int]]:
    """`"high:1,normal:8,low:1"` → (["high", "normal", "low"], [1, 8, 1]); numbers are kept as ints."""
    values: list[int | str] = []
    weights: list[int] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        name = name.strip()
        values.append(int(name) if name.isdigit() else name)
        weights.append(int(weight) if weight.strip() else 1)
    if not values:
        values, weights = ["normal"], [1]
    for value in values:
        if not (isinstance(value, int) and 0 <= value <= 255) and value not in m.PRIORITY_BY_NAME:
            raise ValueError(f"priority {value!r} in {text!r}: use 0-255 or high/normal/low")
    return values, weights


class LocustClient:
    """The Python client, with every request reported to Locust as one `request` event."""

    def __init__(self, environment: Environment, host: str | None) -> None:
        self.address = parse_host(host)
        self._fire = environment.events.request.fire
        self.client: Client | None = None

    def _connected(self) -> Client:
        if self.client is None or not self.client.connected:
            if self.client is not None:
                self.client.close()
            self.client = Client(*self.address, client_name="locust")
        return self.client

    def measure(self, request_type: str, name: str, call: Any, length: Any = None) -> Any:
        """Runs `call(client)` and fires one request event; returns its result, or None when it failed."""
        start = time.perf_counter()
        result = exception = None
        try:
            result = call(self._connected())
        except (BrokerError, ClientError, RequestTimeout, OSError) as exc:
            exception = exc
        self._fire(request_type=request_type, name=name, response_time=(time.perf_counter() - start) * 1000,
                   response_length=length(result) if length is not None and exception is None else 0,
                   exception=exception, context={})
        if isinstance(exception, QueueFull | ClientError):
            time.sleep(BACKOFF_S)  # reported as a failure above; retrying at once would only spin
        return result

    def measure_each(self, request_type: str, name: str, msgs: list[m.Message]) -> None:
        """Sends `msgs` pipelined (one write, one wait) and fires one event per request, each with the
        pipeline's elapsed time and its own outcome."""
        start = time.perf_counter()
        try:
            outcomes: list[Any] = self._connected().pipeline(msgs, return_exceptions=True)
        except (ClientError, OSError) as exc:
            outcomes = [exc] * len(msgs)
        elapsed = (time.perf_counter() - start) * 1000
        for outcome in outcomes:
            failed = isinstance(outcome, BaseException)
            self._fire(request_type=request_type, name=name, response_time=elapsed, response_length=0,
                       exception=outcome if failed else None, context={})

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


class TqUser(User):
    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        self.payload_bytes = getattr(options, "payload_bytes", 100)
        self.batch = getattr(options, "batch", 10)
        self.queue = getattr(options, "queue", "default")
        self.claim_max = getattr(options, "claim_max", 10)
        self.priorities, self.weights = parse_priorities(getattr(options, "priorities", "normal"))
        self.tq = LocustClient(environment, self.host)

    def on_stop(self) -> None:
        self.tq.close()


class ProducerUser(TqUser):
    """Submits tasks as fast as the broker answers: single SUBMITs and, unless --batch 0, SUBMIT_BATCHes."""

    def on_start(self) -> None:
        self.payload = os.urandom(self.payload_bytes)

    def _priority(self) -> int | str:
        return random.choices(self.priorities, self.weights)[0]

    @task(10)
    def submit(self) -> None:
        priority = self._priority()
        self.tq.measure("SUBMIT", f"submit {priority}",
                        lambda c: c.submit("locust.noop", self.payload, queue=self.queue, priority=priority),
                        lambda _reply: len(self.payload))

    @task(1)
    def submit_batch(self) -> None:
        if self.batch <= 0:
            return
        specs = [m.TaskSpec(kind="locust.noop", payload=self.payload, queue=self.queue, priority=self._priority())
                 for _ in range(self.batch)]
        self.tq.measure("SUBMIT_BATCH", f"submit_batch {self.batch}", lambda c: c.submit_batch(specs),
                        lambda ids: len(ids) * len(self.payload))


class WorkerUser(TqUser):
    """Claims up to --claim-max tasks (waiting up to 1 s for the first) and reports them all done with one
    pipelined write of RESULTs (one RESULT event each)."""

    def on_start(self) -> None:
        self.worker_id = f"locust-{uuid.uuid4().hex[:12]}"

    @task
    def claim_and_complete(self) -> None:
        jobs = self.tq.measure(
            "CLAIM", "claim",
            lambda c: c.claim(self.worker_id, [self.queue], max_tasks=self.claim_max, wait_ms=CLAIM_WAIT_MS),
            lambda jobs: sum(len(job.payload) for job in jobs),
        )
        if jobs:
            self.tq.measure_each("RESULT", "result ok", [
                m.Result(id=0, worker_id=self.worker_id, task_id=job.task_id, ok=True) for job in jobs
            ])
