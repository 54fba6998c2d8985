"""The README's five-line example against a real broker: the worker id it only CLAIMs with is not left
behind as a live worker (later "declared dead") once its connection closes; real workers are kept."""

from __future__ import annotations

from tests.conftest import BrokerProcess
from tests.helpers import wait_for
from transport.client import Client


def _worker_ids(client: Client) -> set[str]:
    return {w.worker_id for w in client.workers()}


def test_the_readme_example_leaves_no_worker_behind_once_its_connection_closes(broker: BrokerProcess) -> None:
    admin = broker.client()
    with Client("127.0.0.1", broker.port) as example:  # the README's lines, verbatim but for the port
        task_id = example.submit("resize-image", b"photo-42.jpg", queue="media", priority="high").task_id
        [job] = example.claim("worker-1", ["media"], max_tasks=1, wait_ms=1000)
        example.complete("worker-1", job.task_id, result=b"ok")
        assert example.status(task_id).state == "completed"
        assert "worker-1" in _worker_ids(admin)  # auto-registered by its CLAIM while connected
    wait_for(lambda: "worker-1" not in _worker_ids(admin))


def test_a_worker_that_registered_or_still_holds_a_task_is_kept_when_its_claim_connection_closes(
        broker: BrokerProcess) -> None:
    admin = broker.client()
    admin.register("w-registered", name="real", queues=["q"])
    admin.submit("job", b"", queue="held")
    with Client("127.0.0.1", broker.port) as claims:  # one connection: all three ids first seen on it
        assert claims.claim("w-registered", ["q"], max_tasks=1, wait_ms=0) == []
        [held] = claims.claim("w-holding", ["held"], max_tasks=1, wait_ms=0)
        assert claims.claim("w-fake", ["q"], max_tasks=1, wait_ms=0) == []
    wait_for(lambda: "w-fake" not in _worker_ids(admin))
    # The queue told the registry about w-fake and w-registered at once: this later WORKERS sees both.
    assert {"w-registered", "w-holding"} <= _worker_ids(admin)
    assert admin.status(held.task_id).worker_id == "w-holding"
