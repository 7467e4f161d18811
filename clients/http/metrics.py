"""Prometheus metrics of one ``tokenhive serve``: the requests it saw, and the pool as the
broker reports it at scrape time. Its own CollectorRegistry, so nothing global leaks in.

``tokenhive_http_requests_total`` counts the requests that reached an endpoint: those refused
at the door (401 without a key, 413 over the body cap, 404 for no route) are not in it.

Model labels come from client input, so their number is capped: past ``MAX_MODEL_LABELS``
distinct names a new one is counted as ``_other``, and a model the broker did not know is
counted as ``_unknown``; a client cannot grow the label set without bound.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tokenhive.schemas.messages import Health, StatusReply, Usage

MAX_MODEL_LABELS = 64
OTHER_MODEL = "_other"
UNKNOWN_MODEL = "_unknown"
NO_MODEL = "_none"  # refused before a model was read
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SERVING = (Health.OK, Health.DEGRADED)


class PoolCollector(Collector):
    """The last StatusReply (fetched by the /metrics route just before rendering) as gauges."""

    def __init__(self) -> None:
        self.status: StatusReply | None = None

    def collect(self) -> Iterator[Metric]:
        status = self.status
        up = GaugeMetricFamily("tokenhive_pool_up", "1 if the broker answered the status query")
        up.add_metric([], 0.0 if status is None else 1.0)
        yield up
        if status is None:
            return
        queue = GaugeMetricFamily("tokenhive_pool_queue_depth", "requests queued in the broker",
                                  labels=["model"])
        for model, depth in sorted(status.queues.items()):
            queue.add_metric([model], depth)
        yield queue
        yield GaugeMetricFamily("tokenhive_pool_in_flight", "requests on workers (broker view)",
                                value=status.in_flight)
        labels = ["worker", "model", "backend"]
        healthy = GaugeMetricFamily("tokenhive_pool_worker_healthy",
                                    "1 if the worker is ok or degraded (serving)", labels=labels)
        slots = GaugeMetricFamily("tokenhive_pool_worker_slots", "slots of the worker",
                                  labels=labels)
        free = GaugeMetricFamily("tokenhive_pool_worker_free_slots", "free slots of the worker",
                                 labels=labels)
        for w in status.workers:
            key = [w.id, w.model, w.backend]
            healthy.add_metric(key, 1.0 if w.health in SERVING else 0.0)
            slots.add_metric(key, w.slots)
            free.add_metric(key, w.free_slots)
        yield from (healthy, slots, free)
        events = CounterMetricFamily("tokenhive_broker_events", "the broker's own counters",
                                     labels=["event"])
        for name, value in sorted(status.counters.items()):
            events.add_metric([name], value)
        yield events


class BulkHistogram(Collector):
    """A histogram with one label, fed a whole list of observations at once: a stream's
    inter-token gaps, after it ended. prometheus_client's observe takes locks and walks
    the buckets once per value, which is a cost per token; this is a bisect and an add, on
    the event loop's thread (the only one that observes or renders)."""

    def __init__(self, name: str, documentation: str, label: str,
                 buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = sorted(buckets)
        self.series: dict[str, tuple[list[int], list[float]]] = {}  # label: (counts, [sum])

    def observe_many(self, label: str, values: Sequence[float]) -> None:
        series = self.series.get(label)
        if series is None:
            series = self.series[label] = ([0] * (len(self.bounds) + 1), [0.0])
        counts, total = series
        bounds = self.bounds
        running = total[0]
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # le: the first bound >= value
            running += value  # one by one, as observe() adds: the same float sum
        total[0] = running

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for label, (counts, total) in sorted(self.series.items()):
            cumulative, buckets = 0, []
            for edge, count in zip(edges, counts, strict=True):
                cumulative += count
                buckets.append((edge, float(cumulative)))
            family.add_metric([label], buckets, total[0])
        yield family


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tokenhive_http_requests", "HTTP API requests by outcome "
                                "(ok, or the error code)", ["endpoint", "model", "outcome"],
                                registry=r)
        self.ttft = Histogram("tokenhive_http_ttft_seconds", "arrival to first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.gap = BulkHistogram("tokenhive_http_inter_token_seconds",
                                 "between streamed chunks", "model", GAP_BUCKETS)
        r.register(self.gap)
        self.latency = Histogram("tokenhive_http_request_seconds", "arrival to last byte",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("tokenhive_http_queue_wait_seconds", "time queued in the "
                               "broker (worker-reported)", ["model"], buckets=LATENCY_BUCKETS,
                               registry=r)
        self.tokens_in = Counter("tokenhive_http_prompt_tokens", "prompt tokens", ["model"],
                                 registry=r)
        self.tokens_out = Counter("tokenhive_http_completion_tokens", "generated tokens",
                                  ["model"], registry=r)
        self.in_flight = Gauge("tokenhive_http_in_flight", "requests being answered",
                               registry=r)
        self.pool = PoolCollector()
        r.register(self.pool)
        self._models: set[str] = set()
        # Labelled children, looked up once: labels() takes a lock and builds a tuple each
        # call. Bounded like the labels: endpoints x capped models x error codes.
        self._request_kids: dict[tuple[str, str, str], Counter] = {}
        self._latency_kids: dict[tuple[str, str], Histogram] = {}
        self._model_kids: dict[str, tuple[Histogram, Counter, Counter]] = {}
        self._ttft_kids: dict[str, Histogram] = {}

    def observe_ttft(self, model: str, seconds: float) -> None:
        label = self.model_label(model)
        kid = self._ttft_kids.get(label)
        if kid is None:
            kid = self._ttft_kids[label] = self.ttft.labels(label)
        kid.observe(seconds)

    def model_label(self, model: str) -> str:
        if not model:
            return NO_MODEL
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODEL_LABELS:
            return OTHER_MODEL
        self._models.add(model)
        return model

    def finished(self, endpoint: str, model: str, outcome: str, seconds: float,
                 usage: Usage | None = None, queue_ms: float | None = None) -> None:
        label = UNKNOWN_MODEL if outcome == "unknown_model" else self.model_label(model)
        requests = self._request_kids.get((endpoint, label, outcome))
        if requests is None:
            requests = self._request_kids[endpoint, label, outcome] = self.requests.labels(
                endpoint, label, outcome)
        requests.inc()
        latency = self._latency_kids.get((endpoint, label))
        if latency is None:
            latency = self._latency_kids[endpoint, label] = self.latency.labels(endpoint, label)
        latency.observe(seconds)
        if queue_ms is None and usage is None:
            return
        kids = self._model_kids.get(label)
        if kids is None:
            kids = self._model_kids[label] = (self.queue.labels(label),
                                              self.tokens_in.labels(label),
                                              self.tokens_out.labels(label))
        queue, tokens_in, tokens_out = kids
        if queue_ms is not None:
            queue.observe(queue_ms / 1000.0)
        if usage is not None:
            tokens_in.inc(usage.prompt_tokens)
            tokens_out.inc(usage.completion_tokens)

    def render(self, status: StatusReply | None) -> bytes:
        self.pool.status = status
        return generate_latest(self.registry)
