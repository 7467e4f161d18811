"""What the broker measures per event, for its Prometheus exposition (``metrics_collect``).

Only what the broker state does not already hold is observed here, with plain counting:
request outcomes per model, and four histograms (queue wait, time to first chunk, request
duration per model; inter-chunk gap for all). A histogram is a list of ints, one per bucket,
and a float sum: an observation is one ``bisect`` and two adds, with no lock and no label
lookup, which is what the chunk hot path can afford. Everything else (queue depths, in
flight, workers, nodes, tokens and spend, the broker's counters) is read from the state at
scrape time, on the event loop's thread like every observation, so nothing races.

Times are the broker's: ``state.now`` is read once per batch of received messages, so gaps
between chunks of one batch read as 0 (the broker forwarded them back to back).

Model labels are capped: past ``MAX_MODEL_LABELS`` names a new one is counted as
``_other``; a refused request names a model the broker does not know as ``_unknown``, so
clients cannot grow the label set by sending made-up model names.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from tokenhive.schemas.errors import ErrorCode

if TYPE_CHECKING:
    from tokenhive.broker.job import Job

MAX_MODEL_LABELS = 256
OTHER_MODEL = "_other"
UNKNOWN_MODEL = "_unknown"
NO_MODEL = "_none"
COMPLETED = "completed"

# seconds; le bounds, ascending
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Bucket counts (``counts[i]``: observations with ``bounds[i-1] < v <= bounds[i]``; the
    last one is +Inf) and their sum. Not thread-safe: one thread observes and renders."""

    __slots__ = ("bounds", "counts", "first", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.first = bounds[0]
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # le: the first bound >= value. Under load most chunk gaps are 0 (chunks received
        # in one batch), so the first bucket skips the bisect.
        self.counts[0 if seconds <= self.first else bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class ModelFigures:
    """One model's (label's) outcomes and latency histograms."""

    __slots__ = ("duration", "outcomes", "queue_wait", "ttft")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}  # completed | an ErrorCode value -> requests
        self.queue_wait = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(LATENCY_BUCKETS)


class BrokerMetrics:
    """The per-event observations; ``state.metrics``, fed by ``flow`` and ``worker_events``.

    Hot path (per chunk, in ``WorkerEvents.on_chunk`` and ``packs.on_pack``)::

        if job.chunks:
            gaps.observe(now - job.last_at)   # gaps = state.metrics.gaps
        else:
            job.first_at = now
        job.last_at = now
    """

    def __init__(self) -> None:
        self.gaps = Histogram(GAP_BUCKETS)  # between two chunks of one request
        self.models: dict[str, ModelFigures] = {}

    def figures(self, model: str) -> ModelFigures:
        """The model's figures; past the cap, the shared ``_other`` ones."""
        figures = self.models.get(model)
        if figures is None:
            if len(self.models) >= MAX_MODEL_LABELS and model != OTHER_MODEL:
                return self.figures(OTHER_MODEL)
            figures = self.models[model] = ModelFigures()
        return figures

    def dispatched(self, job: Job, now: float) -> None:
        """A dispatch: the time since the job was (re)queued (one observation per dispatch)."""
        self.figures(job.model).queue_wait.observe(now - job.enqueued_at)

    def finished(self, job: Job, code: ErrorCode | None, now: float) -> None:
        """The one final answer of an accepted request: ``code`` None for a Final. A
        completed request's time to first chunk and duration count from its acceptance."""
        figures = self.figures(job.model)
        outcome = COMPLETED if code is None else code.value
        figures.outcomes[outcome] = figures.outcomes.get(outcome, 0) + 1
        if code is None:
            first = job.first_at or now
            figures.ttft.observe(first - job.accepted_at)
            figures.duration.observe(now - job.accepted_at)

    def refused(self, model: str, code: ErrorCode, known: bool) -> None:
        """A request refused on arrival (never accepted); ``known``: the broker knows the
        model (else it is counted as ``_unknown``)."""
        label = model if known and model else UNKNOWN_MODEL if model else NO_MODEL
        outcomes = self.figures(label).outcomes
        outcomes[code.value] = outcomes.get(code.value, 0) + 1
