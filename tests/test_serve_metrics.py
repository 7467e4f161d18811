"""The serve metrics' own histogram (fed a stream's gaps at once) renders exactly what
prometheus_client's Histogram renders for the same observations, bucket edges included."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tokenhive.clients.http.metrics import GAP_BUCKETS, BulkHistogram, ServeMetrics

# on, between and beyond the bucket edges
VALUES = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.02, 0.3, 2.5, 2.6, 100.0]


def samples(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if line.startswith("tokenhive_http_inter_token_seconds")
            and "_created" not in line]


@pytest.mark.timeout(10)
def test_bulk_histogram_renders_like_prometheus_histogram() -> None:
    ours = CollectorRegistry()
    bulk = BulkHistogram("tokenhive_http_inter_token_seconds", "between streamed chunks",
                         "model", GAP_BUCKETS)
    ours.register(bulk)
    bulk.observe_many("a", VALUES[:4])
    bulk.observe_many("a", VALUES[4:])
    bulk.observe_many("b", [0.01])
    theirs = CollectorRegistry()
    reference = Histogram("tokenhive_http_inter_token_seconds", "between streamed chunks",
                          ["model"], buckets=GAP_BUCKETS, registry=theirs)
    for value in VALUES:
        reference.labels("a").observe(value)
    reference.labels("b").observe(0.01)
    assert samples(ours) == samples(theirs)
    assert 'tokenhive_http_inter_token_seconds_count{model="a"} 10.0' in samples(ours)


@pytest.mark.timeout(10)
def test_finished_counts_each_outcome_once_through_its_cached_child() -> None:
    metrics = ServeMetrics()
    for _ in range(3):
        metrics.finished("chat", "m", "ok", 0.01)
    metrics.finished("chat", "m", "overloaded", 0.01)
    text = metrics.render(None).decode()
    assert 'tokenhive_http_requests_total{endpoint="chat",model="m",outcome="ok"} 3.0' in text
    assert ('tokenhive_http_requests_total{endpoint="chat",model="m",outcome="overloaded"} 1.0'
            in text)
    assert 'tokenhive_http_request_seconds_count{endpoint="chat",model="m"} 4.0' in text
