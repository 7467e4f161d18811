"""Deadlines of pending jobs, soonest first, so a tick finds what expired without a scan.

Entries are never removed early: a job answered before its deadline leaves a stale entry
that is skipped when it comes due. The heap is rebuilt when stale entries dominate.
"""

from __future__ import annotations

import heapq

from tokenhive.broker.job import Job


class DeadlineHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Job]] = []
        self._rebuild_at = 1024

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, job: Job) -> None:
        if job.deadline is not None:
            heapq.heappush(self._heap, (job.deadline, job.seq, job))
            if len(self._heap) >= self._rebuild_at:
                self._compact()

    def due(self, now: float) -> list[Job]:
        """Pending jobs whose deadline is at or before ``now``, soonest first."""
        heap = self._heap
        out: list[Job] = []
        while heap and heap[0][0] <= now:
            job = heapq.heappop(heap)[2]
            if job.pending:
                out.append(job)
        return out

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].pending]
        heapq.heapify(self._heap)
        self._rebuild_at = max(1024, 2 * len(self._heap))
