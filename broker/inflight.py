"""Dispatched requests, keyed by the broker's routing key.

Workers echo the key in the route frame of every stream message: ``b"c" + key`` for a
chunk, ``b"e" + key`` for the terminal. The table is indexed by those two route frames
directly, so the hot path is one dict lookup on the frame as received, with no slicing.
"""

from __future__ import annotations

import itertools
import secrets

from tokenhive.broker.job import Job
from tokenhive.schemas.frames import ROUTE_CHUNK, ROUTE_END

KEY_BYTES = 8


class KeyMaker:
    """8-byte keys from a counter that starts at a random point, so a restarted broker does
    not reuse keys that a worker may still be streaming for its previous incarnation."""

    def __init__(self) -> None:
        self._counter = itertools.count(secrets.randbits(62))

    def __call__(self) -> bytes:
        return (next(self._counter) % (1 << 64)).to_bytes(KEY_BYTES, "big")


class InFlight:
    def __init__(self) -> None:
        self.by_chunk_route: dict[bytes, Job] = {}
        self.by_end_route: dict[bytes, Job] = {}

    def __len__(self) -> int:
        return len(self.by_end_route)

    def add(self, job: Job, key: bytes) -> None:
        job.key = key
        job.chunk_route = ROUTE_CHUNK + key
        job.end_route = ROUTE_END + key
        self.by_chunk_route[job.chunk_route] = job
        self.by_end_route[job.end_route] = job

    def remove(self, job: Job) -> None:
        self.by_chunk_route.pop(job.chunk_route, None)
        self.by_end_route.pop(job.end_route, None)

    def for_end(self, route: bytes) -> Job | None:
        return self.by_end_route.get(route)
