"""The health verdict a worker puts in every heartbeat, and the process memory it reports.

The verdict combines three things:

* the runtime's state: ``loading`` until the backend has started, ``unhealthy`` while
  draining (so the broker sends no more work; see runtime.py);
* the backend's own ``HealthReport`` (a remote backend knows when its upstream is down);
* what the runtime saw: ``degraded_after_errors`` consecutive backend failures turn it
  ``degraded`` until a request succeeds, and a rate limit (from the report's retry_after or a
  RateLimited error's) keeps it ``degraded`` with ``retry_after`` until that time passes.

Client faults (invalid request, context too long), cancels and deadlines say nothing about
the backend's health and do not count.
"""

from __future__ import annotations

import os
import resource
import time

import msgspec

from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.messages import Error, Final, Health
from tokenhive.workers.backend import HealthReport

#: Error codes that mean the backend itself failed.
BACKEND_FAULTS = frozenset({
    ErrorCode.BACKEND_ERROR, ErrorCode.BACKEND_TIMEOUT, ErrorCode.BACKEND_UNAVAILABLE,
    ErrorCode.INTERNAL,
})

_RANK = {Health.OK: 0, Health.DEGRADED: 1, Health.UNHEALTHY: 2, Health.LOADING: 2}


class Verdict(msgspec.Struct, frozen=True):
    health: Health
    detail: str = ""
    retry_after: float | None = None


class HealthTracker:
    def __init__(self, degraded_after_errors: int) -> None:
        self.degraded_after = degraded_after_errors
        self.consecutive_errors = 0
        self.limited_until = 0.0  # monotonic time a rate limit ends

    def record(self, outcome: Final | Error) -> None:
        if isinstance(outcome, Final):
            self.consecutive_errors = 0
        elif outcome.code in BACKEND_FAULTS:
            self.consecutive_errors += 1
        elif outcome.code == ErrorCode.RATE_LIMITED and outcome.retry_after:
            self.limited_until = max(self.limited_until, time.monotonic() + outcome.retry_after)

    def verdict(self, report: HealthReport, *, loaded: bool, draining: bool) -> Verdict:
        if draining:
            return Verdict(Health.UNHEALTHY, "draining")
        if not loaded:
            return Verdict(Health.LOADING, "loading model")
        health, details = report.health, [report.detail] if report.detail else []
        retry_after = report.retry_after if report.retry_after and report.retry_after > 0 else None
        left = self.limited_until - time.monotonic()
        if left > 0:
            retry_after = max(retry_after or 0.0, left)
            details.append("rate limited upstream")
        if retry_after is not None:
            health = _worst(health, Health.DEGRADED)
        if self.degraded_after > 0 and self.consecutive_errors >= self.degraded_after:
            health = _worst(health, Health.DEGRADED)
            details.append(f"{self.consecutive_errors} consecutive backend errors")
        return Verdict(health, "; ".join(details), retry_after)


def _worst(a: Health, b: Health) -> Health:
    return a if _RANK[a] >= _RANK[b] else b


def rss_mb() -> float:
    """This process's resident memory in MiB (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
