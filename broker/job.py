"""One accepted request as the broker tracks it, from admission to its one final answer."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from tokenhive.schemas.messages import Request

if TYPE_CHECKING:
    from tokenhive.broker.registry import Worker


class JobState(enum.Enum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DONE = "done"  # answered (Final or Error sent, or the client is gone)


class Job:
    """Mutable and slotted: the chunk hot path touches ``chunks``, ``worker`` and ``client``."""

    __slots__ = (
        "accepted_at", "attempts", "chunk_route", "chunks", "client", "deadline",
        "dispatched_at", "end_route", "enqueued_at", "first_at", "key", "last_at", "plan",
        "queue_token", "request", "seq", "state", "tried", "worker", "worker_ident",
    )

    def __init__(
        self, client: bytes, request: Request, seq: int, now: float, deadline: float | None
    ) -> None:
        self.client = client  # the client's ROUTER identity
        self.request = request
        self.seq = seq  # admission order, unique per broker run
        self.accepted_at = now
        self.enqueued_at = now  # reset on requeue
        self.deadline = deadline  # monotonic seconds, or None
        self.state = JobState.QUEUED
        self.attempts = 0  # dispatches so far
        self.queue_token = 0  # which queue entry is the live one (see ModelQueue)
        # The gateway (gateway.py): models still to try, and those tried, in order.
        self.plan: list[str] = []
        self.tried: list[str] = []
        # Set per dispatch:
        self.key = b""
        self.chunk_route = b""
        self.end_route = b""
        self.worker: Worker | None = None
        self.worker_ident = b""
        self.dispatched_at = 0.0
        self.first_at = 0.0  # first chunk or terminal of the current attempt; 0 = none yet
        self.last_at = 0.0  # the latest chunk of the current attempt (for the gap histogram)
        self.chunks = 0  # chunks forwarded to the client for the current attempt

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def pending(self) -> bool:
        return self.state is not JobState.DONE

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.model!r}, {self.state.value}, chunks={self.chunks})"


class ClientState:
    """A client with pending requests (clients without any are not tracked)."""

    __slots__ = ("jobs", "last_seen")

    def __init__(self, now: float) -> None:
        self.last_seen = now
        self.jobs: dict[str, Job] = {}  # request id -> pending job
