"""Which of the eligible workers gets the next request. Pluggable by name.

Every strategy receives only workers that can take the request now (registered, health
ok, a free slot, the right kind) and returns one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tokenhive.broker.registry import Worker


class Balancer(Protocol):
    def pick(self, model: str, workers: Sequence[Worker]) -> Worker: ...


class LeastLoaded:
    """Most free slots; ties go to the worker that was dispatched to least recently."""

    def pick(self, model: str, workers: Sequence[Worker]) -> Worker:
        return max(workers, key=lambda w: (w.free_slots, -w.last_dispatch))


class RoundRobin:
    """Each model's workers in registration order, in turn, skipping those that are full."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}  # model -> registered_seq of the last pick

    def pick(self, model: str, workers: Sequence[Worker]) -> Worker:
        last = self._last.get(model, 0)
        ordered = sorted(workers, key=lambda w: w.registered_seq)
        chosen = next((w for w in ordered if w.registered_seq > last), ordered[0])
        self._last[model] = chosen.registered_seq
        return chosen


class Fastest:
    """Lowest recent latency (EWMA of time to first message). Unmeasured workers count as
    fastest so that each gets sampled; ties go to the one with more free slots."""

    def pick(self, model: str, workers: Sequence[Worker]) -> Worker:
        return min(workers, key=lambda w: (w.latency_ms, -w.free_slots, w.last_dispatch))


BALANCERS: dict[str, type[LeastLoaded] | type[RoundRobin] | type[Fastest]] = {
    "least_loaded": LeastLoaded,
    "round_robin": RoundRobin,
    "fastest": Fastest,
}


def make_balancer(name: str) -> Balancer:
    try:
        return BALANCERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown balancer {name!r}; choose one of {', '.join(sorted(BALANCERS))}"
        ) from None
