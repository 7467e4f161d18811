"""Deliver engine events to asyncio queues from the engine thread, one wake-up per step.

``loop.call_soon_threadsafe`` writes to the loop's self-pipe; doing it per token per
sequence would wake the event loop 16 times a step at 16 sequences. The outbox collects a
step's events and hands each event loop its whole share in one call.
"""

from __future__ import annotations

import asyncio

from tokenhive.workers.gguf.slots import Job

Delivery = tuple[asyncio.Queue[object], object]


class Outbox:
    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}

    def put(self, job: Job, event: object) -> None:
        self._items.setdefault(job.loop, []).append((job.queue, event))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, events in items.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


def _deliver(events: list[Delivery]) -> None:
    for q, event in events:
        q.put_nowait(event)
