"""A real pool for the ``tokenhive serve`` tests: a broker process and echo worker processes.

Two models: ``echo`` (fast, 8 slots, echoes the prompt; context of 64 words, so a longer
prompt is refused with context_too_long) and ``slow`` (1 slot, 20 tokens/s, 200 tokens: a
request holds its slot for 10 s unless it is cancelled).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import Proc, start_broker
from tests.support.serve import wait_until
from tests.support.worker_peers import WorkerProc, start_worker
from tokenhive.clients import Client
from tokenhive.schemas.messages import StatusReply

HEARTBEAT = 0.1  # the workers' heartbeat interval: how fast a freed slot shows in status
ECHO_CONTEXT = 64
SLOW_RATE = 20
SLOW_TOKENS = 200


@dataclass
class EchoPool:
    broker: Proc
    workers: list[WorkerProc]
    status_client: Client

    @property
    def address(self) -> str:
        return self.broker.clients

    def status(self) -> StatusReply:
        return self.status_client.status(timeout=5.0)

    def free_slots(self, model: str) -> int:
        return sum(w.free_slots for w in self.status().workers if w.model == model)

    def wait_idle(self, model: str, slots: int, within: float = 15.0) -> float:
        return wait_until(lambda: self.free_slots(model) == slots, within,
                          f"{model} back to {slots} free slots")


@contextmanager
def echo_pool(tmp_path: Path, *, queue_size: int = 10_000) -> Iterator[EchoPool]:
    broker = start_broker(tmp_path, heartbeat_interval=0.2, queue_size=queue_size)
    workers: list[WorkerProc] = []
    client = Client(broker.clients)
    try:
        workers.append(start_worker(broker.workers, tmp_path, "--option",
                                    f"context_length={ECHO_CONTEXT}", model="echo",
                                    worker_id="echo-1", slots=8, interval=HEARTBEAT))
        workers.append(start_worker(broker.workers, tmp_path, "--option",
                                    f"tokens_per_s={SLOW_RATE}", "--option",
                                    f"tokens={SLOW_TOKENS}", model="slow", worker_id="slow-1",
                                    slots=1, interval=HEARTBEAT))
        pool = EchoPool(broker, workers, client)
        wait_until(lambda: sum(w.health == "ok" for w in pool.status().workers) == 2, 30,
                   "both echo workers healthy")
        yield pool
    finally:
        client.close()
        for w in workers:
            w.stop()
        broker.terminate()
