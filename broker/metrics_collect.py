"""The broker's Prometheus exposition: a ``prometheus_client`` Collector over its state.

At each scrape ``collect`` reads one ``StatusReply`` (the broker's own status: queues, in
flight, workers with their heartbeat figures, nodes with their GPUs, counters, spend) and
the observations of ``metrics.BrokerMetrics``, on the broker's event loop thread (the HTTP
server runs in that loop), so it sees one consistent state and races with nothing.

Series are capped per family (``MAX_SERIES``): a broker with more workers or GPUs than that
exposes the first ones by name, and ``tokenhive_metrics_series_dropped`` says how many were
left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tokenhive.broker.metrics import BrokerMetrics, Histogram
from tokenhive.schemas.messages import Health, NodeHealth, StatusReply

MAX_SERIES = 4096  # per family, for the per-worker and per-GPU ones
MB = 2**20
SERVING = (Health.OK.value, Health.DEGRADED.value)
T = TypeVar("T")


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if math.isinf(bound) else floatToGoString(bound), float(count))
            for bound, count in histogram.cumulative()]


class BrokerCollector(Collector):
    def __init__(self, status: Callable[[], StatusReply], metrics: BrokerMetrics) -> None:
        self.status = status
        self.metrics = metrics
        self.dropped = 0  # series left out by the caps, during one collect

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        self.dropped = 0
        yield from self._requests()
        yield from self._pool(status)
        yield from self._workers(status)
        yield from self._nodes(status)
        yield from self._counters(status)
        yield GaugeMetricFamily("tokenhive_metrics_series_dropped",
                                f"series left out past {MAX_SERIES} per family",
                                value=self.dropped)

    def _capped(self, items: list[T]) -> list[T]:
        self.dropped += max(0, len(items) - MAX_SERIES)
        return items[:MAX_SERIES]

    def _requests(self) -> Iterator[Metric]:
        models = sorted(self.metrics.models.items())
        requests = CounterMetricFamily(
            "tokenhive_requests", "requests answered, by outcome (completed, or the error "
            "code); refused ones included", labels=["model", "outcome"])
        for model, figures in models:
            for outcome, n in sorted(figures.outcomes.items()):
                requests.add_metric([model, outcome], n)
        yield requests
        for name, attr, doc in (
            ("tokenhive_queue_wait_seconds", "queue_wait",
             "time queued before a dispatch (one observation per dispatch)"),
            ("tokenhive_ttft_seconds", "ttft",
             "completed requests: acceptance to the first chunk forwarded"),
            ("tokenhive_request_duration_seconds", "duration",
             "completed requests: acceptance to the final answer"),
        ):
            family = HistogramMetricFamily(name, doc, labels=["model"])
            for model, figures in models:
                histogram: Histogram = getattr(figures, attr)
                if histogram.count:
                    family.add_metric([model], _buckets(histogram), histogram.sum)
            yield family
        gaps = self.metrics.gaps
        yield HistogramMetricFamily(
            "tokenhive_chunk_gap_seconds", "between two chunks of one request, as forwarded",
            buckets=_buckets(gaps), sum_value=gaps.sum)

    def _pool(self, status: StatusReply) -> Iterator[Metric]:
        depth = GaugeMetricFamily("tokenhive_queue_depth", "requests queued",
                                  labels=["model"])
        for model, n in sorted(status.queues.items()):
            depth.add_metric([model], n)
        yield depth
        yield GaugeMetricFamily("tokenhive_in_flight", "requests dispatched to workers",
                                value=status.in_flight)
        tokens = CounterMetricFamily("tokenhive_tokens", "tokens of completed requests (their "
                                     "Final usage)", labels=["model", "direction"])
        cost = CounterMetricFamily("tokenhive_cost_usd", "priced cost of completed requests",
                                   labels=["model"])
        for model, spend in sorted(status.spend_by_model.items()):
            tokens.add_metric([model, "in"], spend.prompt_tokens)
            tokens.add_metric([model, "out"], spend.completion_tokens)
            cost.add_metric([model], spend.cost_usd)
        yield tokens
        yield cost
        profile_tokens = CounterMetricFamily("tokenhive_profile_tokens", "tokens of completed "
                                             "requests per profile", labels=["profile",
                                                                             "direction"])
        for profile, spend in sorted(status.spend_by_profile.items()):
            profile_tokens.add_metric([profile, "in"], spend.prompt_tokens)
            profile_tokens.add_metric([profile, "out"], spend.completion_tokens)
        yield profile_tokens
        cooldown = GaugeMetricFamily("tokenhive_model_cooldown_seconds",
                                     "seconds a failing model is still skipped",
                                     labels=["model"])
        for model, left in sorted(status.cooldowns.items()):
            cooldown.add_metric([model], left)
        yield cooldown
        yield GaugeMetricFamily("tokenhive_uptime_seconds", "since the broker started",
                                value=status.uptime_s)

    def _workers(self, status: StatusReply) -> Iterator[Metric]:
        labels = ["worker", "model", "node"]
        up = GaugeMetricFamily("tokenhive_worker_up", "1 if the worker serves (ok or degraded)",
                               labels=[*labels, "health"])
        slots = GaugeMetricFamily("tokenhive_worker_slots", "requests at once", labels=labels)
        free = GaugeMetricFamily("tokenhive_worker_free_slots", "slots free (broker's count)",
                                 labels=labels)
        tps = GaugeMetricFamily("tokenhive_worker_decode_tokens_per_second",
                                "generated tokens/s over its last heartbeat interval",
                                labels=labels)
        kv = GaugeMetricFamily("tokenhive_worker_kv_cache_used_ratio",
                               "KV-cache cells in use (0..1)", labels=labels)
        hits = CounterMetricFamily("tokenhive_worker_prefix_cache_hits",
                                   "requests that reused a cached prompt prefix",
                                   labels=labels)
        for w in self._capped(sorted(status.workers, key=lambda w: w.id)):
            key = [w.id, w.model, w.node]
            up.add_metric([*key, w.health], 1.0 if w.health in SERVING else 0.0)
            slots.add_metric(key, w.slots)
            free.add_metric(key, w.free_slots)
            tps.add_metric(key, w.decode_tps)
            kv.add_metric(key, w.kv_used)
            hits.add_metric(key, w.prefix_hits)
        yield from (up, slots, free, tps, kv, hits)

    def _nodes(self, status: StatusReply) -> Iterator[Metric]:
        health = GaugeMetricFamily("tokenhive_node_health", "1 on the node's health, 0 on the "
                                   "others", labels=["node", "health"])
        draining = GaugeMetricFamily("tokenhive_node_draining", "1 if no new work goes there",
                                     labels=["node"])
        used = GaugeMetricFamily("tokenhive_gpu_memory_used_bytes", "as the node agent reports",
                                 labels=["node", "gpu", "name"])
        total = GaugeMetricFamily("tokenhive_gpu_memory_total_bytes",
                                  "as the node agent reports", labels=["node", "gpu", "name"])
        busy = GaugeMetricFamily("tokenhive_gpu_utilization_ratio", "where NVML reports it",
                                 labels=["node", "gpu", "name"])
        gpus = []
        for node in self._capped(status.nodes):
            for state in NodeHealth:
                health.add_metric([node.id, state.value], 1.0 if node.health == state else 0.0)
            draining.add_metric([node.id], 1.0 if node.draining else 0.0)
            gpus += [(node.id, gpu) for gpu in node.gpus]
        for node_id, gpu in self._capped(gpus):
            key = [node_id, str(gpu.index), gpu.name]
            used.add_metric(key, gpu.memory_used_mb * MB)
            total.add_metric(key, gpu.memory_total_mb * MB)
            if gpu.utilization_pct is not None:
                busy.add_metric(key, gpu.utilization_pct / 100.0)
        yield from (health, draining, used, total, busy)

    def _counters(self, status: StatusReply) -> Iterator[Metric]:
        counters = status.counters
        yield CounterMetricFamily("tokenhive_bad_frames", "garbage on either socket",
                                  value=counters.get("bad_frames", 0))
        yield CounterMetricFamily("tokenhive_auth_failures", "refused CURVE handshakes",
                                  value=counters.get("auth_failures", 0))
        yield CounterMetricFamily("tokenhive_chunks", "chunks forwarded",
                                  value=counters.get("chunks", 0))
        events = CounterMetricFamily("tokenhive_broker_events", "the broker's status counters",
                                     labels=["event"])
        gauges = {"queued", "in_flight", "clients", "workers"}  # status extras that are levels
        for name, value in sorted(counters.items()):
            if name not in gauges:
                events.add_metric([name], value)
        yield events
        yield GaugeMetricFamily("tokenhive_clients", "clients with pending requests",
                                value=counters.get("clients", 0))
        yield GaugeMetricFamily("tokenhive_workers", "registered workers",
                                value=counters.get("workers", 0))


def broker_registry(status: Callable[[], StatusReply], metrics: BrokerMetrics
                    ) -> CollectorRegistry:
    """A private registry holding only the broker's collector (no process-global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(status, metrics))
    return registry
