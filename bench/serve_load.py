"""Driving a system with a workload: open loop (arrivals on a schedule) or closed loop.

Open loop: each item is sent at its arrival offset whether or not earlier ones have
answered, as real users arrive; a system past saturation shows it as growing latency, not
as a slower sender. Closed loop: ``concurrency`` lanes, each sending its next item as soon
as its previous answer ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from bench.serve_metrics import Record
from bench.serve_workload import Item

Sender = Callable[[Item], Coroutine[Any, Any, Record]]


async def open_loop(send: Sender, items: list[Item]) -> tuple[float, list[Record]]:
    """(start time, one record per item in item order)."""
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[Record]] = []
    for item in items:
        wait = t0 + item.arrival - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)  # the arrival schedule itself, not a synchronisation
        tasks.append(asyncio.create_task(send(item)))
    return t0, list(await asyncio.gather(*tasks))


async def closed_loop(send: Sender, items: list[Item], concurrency: int
                      ) -> tuple[float, list[Record]]:
    """(start time, records in completion order); arrival offsets are ignored."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    todo = iter(items)
    records: list[Record] = []

    async def lane() -> None:
        for item in todo:
            records.append(await send(item))

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return t0, records
