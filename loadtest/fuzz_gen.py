"""Request generation for the fuzzer: valid requests of every type, and mutations of them.

Why seeded and separate: one `random.Random` per fuzz thread makes a run reproducible from `--seed`, and
the generator is the part worth reading when a finding needs explaining (what exactly was sent).
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec

from loadtest.fuzz_wire import REQ, frame, pack


class Gen:
    """Valid requests, and mutations of them, from one seeded `random.Random`."""

    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag
        self.next_id = rng.randrange(2, 1 << 30)
        self.seen_task_ids: list[str] = []
        self.too_deep = False  # the last mutation nested deeper than the broker's decoder goes

    def rid(self) -> int:
        self.next_id = self.next_id % 0xFFFF_FFF0 + 1
        return self.next_id

    def text(self, lo: int = 1, hi: int = 12) -> str:
        alphabet = "abcxyz019_-.:/ é\u2603\U0001f600\n\0"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(lo, hi)))

    def queue(self) -> str:
        return f"fuzz-{self.tag}-{self.rng.randrange(4)}"

    def worker(self) -> str:
        return f"fuzz-{self.tag}-w{self.rng.randrange(3)}"

    def task_id(self) -> str:
        if self.seen_task_ids and self.rng.random() < 0.6:
            return self.rng.choice(self.seen_task_ids)
        return self.text(1, 30)

    def spec(self) -> dict[str, Any]:
        r = self.rng
        spec: dict[str, Any] = {"kind": f"fuzz.{r.randrange(5)}"}
        if r.random() < 0.7:
            spec["payload"] = r.randbytes(r.randrange(64))
        if r.random() < 0.8:
            spec["queue"] = self.queue()
        if r.random() < 0.5:
            spec["priority"] = r.choice([r.randrange(256), "high", "normal", "low"])
        if r.random() < 0.2:
            spec["run_at"] = time.time() + r.uniform(-10, 5)
        if r.random() < 0.2:
            spec["max_retries"] = r.randrange(4)
        if r.random() < 0.2:
            spec["lease_ms"] = r.randrange(100, 60_000)
        if r.random() < 0.2:
            spec["unique_key"] = f"u{r.randrange(10)}"
        return spec

    def valid(self) -> tuple[int, dict[str, Any]]:
        r, rid = self.rng, self.rid()
        name = r.choice(list(REQ))
        body: dict[str, Any] = {"id": rid}
        if name == "HELLO":
            body.update(client=self.text(), protocol=1)
        elif name == "SUBMIT":
            body.update(task=self.spec())
        elif name == "SUBMITBATCH":
            body.update(tasks=[self.spec() for _ in range(r.randint(1, 5))])
        elif name == "CLAIM":
            body.update(worker_id=self.worker(), queues=[self.queue() for _ in range(r.randint(1, 3))],
                        max_tasks=r.randint(-1, 5), wait_ms=0)
        elif name == "RESULT":
            body.update(worker_id=self.worker(), task_id=self.task_id(), ok=r.random() < 0.5,
                        result=r.randbytes(r.randrange(32)), error=self.text(), retry=r.random() < 0.5)
        elif name == "HEARTBEAT":
            body.update(worker_id=self.worker(), active=[self.task_id() for _ in range(r.randrange(3))],
                        cpu_percent=r.uniform(0, 100), memory_bytes=r.randrange(1 << 32))
        elif name in ("STATUS", "CANCEL"):
            body.update(task_id=self.task_id())
        elif name == "REGISTER":
            body.update(worker_id=self.worker(), name=self.text(), hostname="fuzzhost", pid=r.randrange(1 << 16),
                        queues=[self.queue()], concurrency=r.randrange(8), metadata={self.text(): self.text()})
        elif name == "DEREGISTER":
            body.update(worker_id=self.worker())
        elif name == "QUERY":
            body.update(sql=r.choice(["SELECT count(*) FROM task_history", "SELECT 1",
                                      "SELECT state, count(*) FROM task_history GROUP BY state"]))
        return REQ[name], body

    def valid_frame(self) -> bytes:
        type_byte, body = self.valid()
        return frame(type_byte, pack(body))

    def junk(self, depth: int = 0) -> Any:
        """A random MessagePack value of a random type, sometimes big or deeply nested."""
        r = self.rng
        roll = r.random()
        if roll < 0.08 and depth == 0:  # built as raw bytes: the encoder itself refuses this depth
            levels = r.choice([50, 500, 5000, 100_000])
            self.too_deep |= levels >= 500  # answered with id 0: the broker cannot read the id past it
            return msgspec.Raw(r.choice([b"\x91", b"\x81\xa1k"]) * levels + b"\xc0")
        if roll < 0.12 and depth == 0:
            return r.choice(["x" * r.choice([201, 1001, 4097, 65_537, 200_000]), b"\0" * 300_000,
                             list(range(r.choice([1001, 10_001, 100_001])))])
        choices = [
            None, True, False, 0, -1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, r.randrange(-1000, 1000),
            float("nan"), float("inf"), float("-inf"), -0.0, 1e308, r.random(), "", self.text(),
            "high", "default", r.randbytes(r.randrange(20)), b"",
        ]
        if depth < 3:
            choices += [[self.junk(depth + 1) for _ in range(r.randrange(4))],
                        {self.text(): self.junk(depth + 1) for _ in range(r.randrange(4))}]
        return r.choice(choices)

    def mutate(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.rng
        self.too_deep = False
        for _ in range(r.randint(1, 3)):
            target = body
            if "task" in body and r.random() < 0.5:
                target = body["task"]
            elif body.get("tasks") and r.random() < 0.5:
                target = r.choice(body["tasks"]) if isinstance(body["tasks"], list) and body["tasks"] else body
            if not isinstance(target, dict) or not target:
                continue
            key = r.choice(list(target))
            op = r.random()
            if op < 0.25:
                del target[key]
            elif op < 0.85:
                target[key] = self.junk()
            else:
                target[self.text()] = self.junk()
        return body
