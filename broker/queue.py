"""Per-model bounded queue: higher priority leaves first, FIFO within a priority.

Removal (cancel, deadline, client gone) is lazy: the job's ``queue_token`` stops matching
its entry, and the entry is skipped when it reaches the front. That keeps removal O(1) when
thousands of queued requests expire at once; the lanes are compacted when stale entries
outnumber live ones, so memory stays bounded even when nothing is ever popped.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

from tokenhive.broker.job import Job

_Entry = tuple[int, Job]  # (token, job); live iff job.queue_token == token


class ModelQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lanes: dict[int, deque[_Entry]] = {}
        self._order: list[int] = []  # priorities present, highest first
        self._tokens = itertools.count(1)
        self._live = 0
        self._stale = 0

    def __len__(self) -> int:
        return self._live

    @property
    def full(self) -> bool:
        return self._live >= self.limit

    def push(self, job: Job, *, front: bool = False) -> None:
        """Append ``job`` to its priority lane (``front``: ahead of its lane, for requeues).

        Never refuses: callers check ``full`` before admitting new work, and requeued work
        was already admitted, so it may take the queue past its limit.
        """
        token = next(self._tokens)
        job.queue_token = token
        lane = self._lanes.get(job.priority)
        if lane is None:
            lane = self._lanes[job.priority] = deque()
            self._order = sorted(self._lanes, reverse=True)
        if front:
            lane.appendleft((token, job))
        else:
            lane.append((token, job))
        self._live += 1

    def peek(self) -> Job | None:
        found: Job | None = None
        emptied: list[int] = []
        for priority in self._order:
            lane = self._lanes[priority]
            while lane:
                token, job = lane[0]
                if job.queue_token == token:
                    found = job
                    break
                lane.popleft()
                self._stale -= 1
            if found is not None:
                break
            emptied.append(priority)
        if emptied:  # drop empty lanes so arbitrary client priorities cannot pile up lanes
            for priority in emptied:
                del self._lanes[priority]
            self._order = sorted(self._lanes, reverse=True)
        return found

    def pop(self) -> Job | None:
        job = self.peek()
        if job is not None:
            self._lanes[job.priority].popleft()
            job.queue_token = 0
            self._live -= 1
        return job

    def discard(self, job: Job) -> bool:
        """Take ``job`` out of the queue; False if it was not queued here."""
        if job.queue_token == 0:
            return False
        job.queue_token = 0
        self._live -= 1
        self._stale += 1
        if self._stale > max(1024, self._live):
            self._compact()
        return True

    def __iter__(self) -> Iterator[Job]:
        """Live jobs in the order they would leave."""
        for priority in self._order:
            for token, job in self._lanes[priority]:
                if job.queue_token == token:
                    yield job

    def _compact(self) -> None:
        for priority, lane in self._lanes.items():
            self._lanes[priority] = deque(e for e in lane if e[1].queue_token == e[0])
        self._stale = 0
