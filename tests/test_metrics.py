"""The broker's Prometheus endpoint (``--metrics``): scraped during and after real runs (a
broker process, echo or GGUF worker processes, a raw client), every figure checked against
what the run did; and the tiny HTTP server's caps, in-process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.broker_peers import FakeClient
from tests.support.procs import ipc_address, start_broker
from tests.support.worker_peers import WorkerProc, start_worker
from tests.test_cli import UpProcess
from tokenhive import metrics_http
from tokenhive.broker import metrics as metrics_module
from tokenhive.broker import metrics_collect
from tokenhive.broker.metrics import GAP_BUCKETS, BrokerMetrics
from tokenhive.broker.metrics_collect import broker_registry
from tokenhive.metrics_http import MetricsServer, parse_address
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.messages import (
    Chunk,
    Error,
    Final,
    GpuInfo,
    NodeHealth,
    NodeStatus,
    Pack,
    Sampling,
    StatusReply,
    WorkerStatus,
)
from tokenhive.workers.token_rate import TokenRate

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    """Every sample of one scrape: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[metric, frozenset(labels.items())]


def scrape_until(address: str, ok: Callable[[Samples], bool], within: float = 30.0) -> Samples:
    deadline = time.monotonic() + within
    samples: Samples = {}
    while time.monotonic() < deadline:
        samples = scrape(address)
        if ok(samples):
            return samples
        time.sleep(0.03)  # polling interval, not synchronisation
    raise TimeoutError(f"metrics condition not met in {within}s; last scrape: {samples}")


def bucket(samples: Samples, metric: str, le: str, /, **labels: str) -> float:
    return value(samples, f"{metric}_bucket", le=le, **labels)


def stream_results(client: FakeClient, ids: list[str], timeout: float
                   ) -> tuple[dict[str, int], dict[str, Final | Error]]:
    """Chunks received per request (alone or inside Packs) and each request's terminal."""
    chunks = dict.fromkeys(ids, 0)
    ends: dict[str, Final | Error] = {}
    deadline = time.monotonic() + timeout
    while len(ends) < len(ids):
        msg = client.recv(max(0.0, deadline - time.monotonic()))
        if isinstance(msg, Chunk):
            chunks[msg.id] += 1
        elif isinstance(msg, Pack):
            for chunk in msg.chunks:
                chunks[chunk.id] += 1
        elif isinstance(msg, (Final, Error)):
            ends[msg.id] = msg
    return chunks, ends


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packing", [False, True], ids=["chunks", "packs"])
def test_metrics_during_and_after_a_run_match_what_it_did(tmp_path: Path, packing: bool
                                                          ) -> None:
    """6 requests on 4 slots (2 echo workers x 2), each streaming 30 tokens at 10/s: while
    the first 4 stream, 4 are in flight and 2 queued; afterwards every counter and histogram
    adds up to what the client received (chunk by chunk, or packed per worker step)."""
    broker = start_broker(tmp_path, heartbeat_interval=0.2, metrics="127.0.0.1:0")
    address = broker.ready["metrics"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    paced = ("--option", "tokens=30", "--option", "tokens_per_s=10",
             *(["--pack-chunks"] if packing else []))
    workers = [start_worker(broker.workers, tmp_path, *paced, worker_id=f"w{i}", slots=2,
                            interval=0.2) for i in range(2)]
    client = FakeClient(broker.clients)
    n = 6
    try:
        scrape_until(address, lambda s: sum(
            v for (name, _), v in s.items() if name == "tokenhive_worker_up") == 2)
        for i in range(n):
            client.submit(f"r{i}", model="echo", prompt="one two three", timeout=60)
        during = scrape_until(address, lambda s: value(s, "tokenhive_in_flight") == 4
                              and value(s, "tokenhive_queue_depth", model="echo") == 2)
        for w in ("w0", "w1"):
            assert value(during, "tokenhive_worker_free_slots", worker=w, model="echo",
                         node="") == 0
        assert not [k for k in during if k[0] == "tokenhive_requests_total"]  # none ended yet

        per_request, ends = stream_results(client, [f"r{i}" for i in range(n)], 60)
        finals = list(ends.values())
        assert all(isinstance(f, Final) for f in finals), finals
        chunks = sum(per_request.values())
        assert chunks == 30 * n

        # refused at the door: an invalid request (under its model) and an unknown model
        client.submit("bad", model="echo", prompt="x", timeout=-1)
        client.submit("who", model="nobody", prompt="x")
        refusals = [client.terminal("bad"), client.terminal("who")]
        assert [e.code.value for e in refusals if isinstance(e, Error)] == [
            "invalid_request", "unknown_model"]
        client.send_frames([b"garbage"])  # one frame, no version: a bad frame
        after = scrape_until(address, lambda s: value(s, "tokenhive_bad_frames_total") == 1)

        assert value(after, "tokenhive_requests_total", model="echo", outcome="completed") == n
        assert value(after, "tokenhive_requests_total", model="echo",
                     outcome="invalid_request") == 1
        assert value(after, "tokenhive_requests_total", model="_unknown",
                     outcome="unknown_model") == 1
        assert value(after, "tokenhive_in_flight") == 0
        assert value(after, "tokenhive_queue_depth", model="echo") == 0
        for w in ("w0", "w1"):
            assert value(after, "tokenhive_worker_free_slots", worker=w, model="echo",
                         node="") == 2
            assert value(after, "tokenhive_worker_slots", worker=w, model="echo", node="") == 2
            assert value(after, "tokenhive_worker_up", worker=w, model="echo", node="",
                         health="ok") == 1
        out = sum(f.usage.completion_tokens for f in finals if isinstance(f, Final))
        prompt = sum(f.usage.prompt_tokens for f in finals if isinstance(f, Final))
        assert out == 30 * n and prompt == 3 * n
        assert value(after, "tokenhive_tokens_total", model="echo", direction="out") == out
        assert value(after, "tokenhive_tokens_total", model="echo", direction="in") == prompt
        assert value(after, "tokenhive_chunks_total") == chunks
        # one TTFT and one duration per completed request, one queue wait per dispatch
        for name in ("tokenhive_ttft_seconds", "tokenhive_request_duration_seconds",
                     "tokenhive_queue_wait_seconds"):
            assert value(after, f"{name}_count", model="echo") == n, name
        # the 2 requests queued behind a whole 3 s stream waited more than 1 s, the 4
        # dispatched at once less; their TTFT includes that wait
        assert bucket(after, "tokenhive_queue_wait_seconds", "1.0", model="echo") == 4
        assert bucket(after, "tokenhive_ttft_seconds", "1.0", model="echo") == 4
        durations = value(after, "tokenhive_request_duration_seconds_sum", model="echo")
        # token i is due 0.1 s * i after a stream starts, and a queued one started after a
        # whole stream ended: durations add up to at least 4 x 2.9 s + 2 x 5.8 s
        assert durations >= 23.2 - 0.1
        # every chunk but each request's first was a gap; the tokens came 10 per second
        gaps = value(after, "tokenhive_chunk_gap_seconds_count")
        assert gaps == chunks - n
        assert 0.05 < value(after, "tokenhive_chunk_gap_seconds_sum") / gaps < 1.0
        assert bucket(after, "tokenhive_chunk_gap_seconds", "+Inf") == gaps
        assert value(after, "tokenhive_broker_events_total", event="accepted") == n
        packs = value(after, "tokenhive_broker_events_total", event="packs")
        assert packs > 0 if packing else packs == 0  # the pack path did run (or did not)
    finally:
        client.close()
        for w in workers:
            w.stop()
        broker.terminate()


def gguf_worker(broker: str, tmp_path: Path, model: Path) -> WorkerProc:
    spec = {"backend": "gguf", "model": "tiny", "path": str(model), "n_ctx": 512,
            "n_threads": 1, "slots": 1}
    args = ["--broker", broker, "--id", "g0", "--heartbeat-interval", "1.0",
            "--spec-json", json.dumps(spec), "--log-level", "info"]
    return WorkerProc(args, tmp_path / "g0.log")


@pytest.mark.timeout(120)
def test_gguf_worker_heartbeats_carry_decode_rate_kv_use_and_prefix_hits(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """Heartbeats once a second, so a decode rate reported after generating stays visible
    for a second: it is positive; the KV cache holds the prompt and output (a share of the
    512 cells); the same prompt again is a prefix-cache hit."""
    broker = start_broker(tmp_path, heartbeat_interval=1.0, metrics="127.0.0.1:0")
    address = broker.ready["metrics"]
    worker = gguf_worker(broker.workers, tmp_path, tiny_gguf)
    client = FakeClient(broker.clients)
    labels = {"worker": "g0", "model": "tiny", "node": ""}
    try:
        scrape_until(address, lambda s: s.get(("tokenhive_worker_up", frozenset(
            {**labels, "health": "ok"}.items()))) == 1, within=60)
        before = scrape(address)
        assert value(before, "tokenhive_worker_kv_cache_used_ratio", **labels) == 0
        assert value(before, "tokenhive_worker_decode_tokens_per_second", **labels) == 0
        prompt = "once upon a time the cat and the dog"
        client.submit("a", model="tiny", prompt=prompt, timeout=60,
                      sampling=Sampling(max_tokens=200, temperature=0))
        busy = scrape_until(address, lambda s: value(
            s, "tokenhive_worker_decode_tokens_per_second", **labels) > 0, within=60)
        assert value(busy, "tokenhive_worker_decode_tokens_per_second", **labels) > 0
        first = client.terminal("a", timeout=60)
        assert isinstance(first, Final) and first.usage.completion_tokens == 200
        client.submit("b", model="tiny", prompt=prompt, timeout=60,
                      sampling=Sampling(max_tokens=4, temperature=0))
        second = client.terminal("b", timeout=60)
        assert isinstance(second, Final)
        after = scrape_until(address, lambda s: value(
            s, "tokenhive_worker_prefix_cache_hits_total", **labels) >= 1)
        assert value(after, "tokenhive_worker_prefix_cache_hits_total", **labels) == 1
        kv = value(after, "tokenhive_worker_kv_cache_used_ratio", **labels)
        # the slot keeps b's prompt and what it decoded (its last sampled token is not)
        cells = second.usage.prompt_tokens + second.usage.completion_tokens - 1
        assert 0 < kv <= 1 and abs(kv * 512 - cells) <= 1, (kv * 512, cells)
    finally:
        client.close()
        worker.stop()
        broker.terminate()


@pytest.mark.timeout(90)
def test_up_passes_metrics_to_its_broker(tmp_path: Path) -> None:
    up = UpProcess(["--backend", "echo", "--model", "m", "--workers", "2", "--metrics",
                    "127.0.0.1:0", "--worker-endpoint", ipc_address(tmp_path, "w")],
                   tmp_path / "up.stderr")
    try:
        url = up.expect("metrics on http://").rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        address = url.removeprefix("http://").removesuffix("/metrics")
        scrape_until(address, lambda s: sum(
            v for (name, labels), v in s.items()
            if name == "tokenhive_worker_up" and ("model", "m") in labels) == 2, within=60)
    finally:
        assert up.stop() == 0
    bad = UpProcess(["--backend", "echo", "--model", "m", "--metrics", "host:port"],
                    tmp_path / "bad.stderr")
    assert bad.proc.wait(30) == 2  # refused before anything started
    bad.stop()
    assert "metrics must be HOST:PORT, got 'host:port'" in (tmp_path / "bad.stderr").read_text()


@pytest.mark.timeout(30)
def test_broker_refuses_a_bad_metrics_address() -> None:
    done = subprocess.run([sys.executable, "-m", "tokenhive.broker", "--metrics", "host:port"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert "metrics must be HOST:PORT, got 'host:port'" in done.stderr


@pytest.mark.timeout(10)
def test_parse_address() -> None:
    assert parse_address("9100") == ("127.0.0.1", 9100)
    assert parse_address(":0") == ("127.0.0.1", 0)
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    for bad in ("host:port", "127.0.0.1:65536", "a b:1", "[nope]:1", ""):
        with pytest.raises(ValueError):
            parse_address(bad)


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection, then read until the server closes it (b"": it
    closed without answering; a reset, when it closed with our request unread, too)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.timeout(30)
def test_http_server_answers_only_get_metrics_and_caps_what_clients_control(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_http, "READ_TIMEOUT", 0.3)
    renders: list[int] = []

    def render() -> bytes:
        renders.append(1)
        return b"tokenhive_up 1.0\n"

    async def main() -> None:
        server = MetricsServer(render)
        bound = await server.start("127.0.0.1:0")
        port = int(bound.rpartition(":")[2])
        try:
            ok = await exchange(port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
            assert f"Content-Type: {CONTENT_TYPE_LATEST}".encode() in ok
            assert ok.endswith(b"\r\n\r\ntokenhive_up 1.0\n")
            head = await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
            post = await exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
            other = await exchange(port, b"GET /status HTTP/1.1\r\n\r\n")
            assert other.startswith(b"HTTP/1.1 404 ")
            junk = await exchange(port, b"HELLO\r\n\r\n")
            assert junk.startswith(b"HTTP/1.1 400 ")
            big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
            assert (await exchange(port, big)).startswith(b"HTTP/1.1 431 ")
            # a head that never completes: closed after READ_TIMEOUT, unanswered
            started = time.monotonic()
            assert await exchange(port, b"GET /metrics HTTP/1.1\r\n") == b""
            assert time.monotonic() - started < 3
            assert len(renders) == 2  # only the two /metrics answers rendered
            # Past MAX_CONNECTIONS open at once, a new connection is closed unanswered. The
            # server accepts in connection order and counts a connection as soon as it is
            # accepted, so the 16 slow ones below are counted before the extra one arrives.
            monkeypatch.setattr(metrics_http, "READ_TIMEOUT", 10.0)
            slow = [await asyncio.open_connection("127.0.0.1", port)
                    for _ in range(metrics_http.MAX_CONNECTIONS)]
            for _, writer in slow:
                writer.write(b"GET /metrics HTTP/1.1\r\n")  # the head is not complete yet
            assert await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
            for reader, writer in slow:  # those within the cap are answered once complete
                writer.write(b"\r\n")
                assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
                writer.close()
            assert server.open == 0
            again = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert again.startswith(b"HTTP/1.1 200 OK")
        finally:
            await server.close()

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_histogram_renders_like_prometheus_client() -> None:
    """Bucket counting by bisect (with the first-bucket shortcut) renders exactly what
    prometheus_client's own Histogram renders for the same observations."""
    values = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.02, 0.3, 2.5, 2.6, 100.0]
    ours = BrokerMetrics()
    for v in values:
        ours.gaps.observe(v)
    reference_registry = CollectorRegistry()
    reference = Histogram("tokenhive_chunk_gap_seconds", "x", buckets=GAP_BUCKETS,
                          registry=reference_registry)
    for v in values:
        reference.observe(v)

    def lines(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if line.startswith("tokenhive_chunk_gap_seconds_")
                and "_created" not in line]

    registry = broker_registry(lambda: StatusReply([], {}, 0, {}), ours)
    assert lines(registry) == lines(reference_registry)


@pytest.mark.timeout(10)
def test_model_labels_capped_and_refusals_of_unknown_models_pooled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_MODEL_LABELS", 3)
    m = BrokerMetrics()
    for model in ("a", "b", "c", "d", "e"):
        m.refused(model, ErrorCode.OVERLOADED, known=True)
    m.refused("made-up-1", ErrorCode.UNKNOWN_MODEL, known=False)
    m.refused("", ErrorCode.INVALID_REQUEST, known=False)
    assert sorted(m.models) == ["_other", "a", "b", "c"]
    assert m.models["_other"].outcomes == {"overloaded": 2, "unknown_model": 1,
                                           "invalid_request": 1}


@pytest.mark.timeout(10)
def test_nodes_and_gpus_exposed_and_series_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [GpuInfo(index=i, name="H200", memory_used_mb=1024.0 * (i + 1),
                    memory_total_mb=143771.0, utilization_pct=50.0 if i == 0 else None)
            for i in range(2)]
    status = StatusReply(
        workers=[WorkerStatus(id=f"w{i}", model="m", backend="gguf", health="ok", slots=2,
                              free_slots=1, in_flight=1, node="n1", decode_tps=12.5,
                              kv_used=0.25, prefix_hits=3) for i in range(3)],
        queues={"m": 4}, in_flight=3, counters={"bad_frames": 2, "auth_failures": 1},
        nodes=[NodeStatus(id="n1", health=NodeHealth.DEGRADED, gpus=gpus),
               NodeStatus(id="n2", health=NodeHealth.DOWN, draining=True)])
    monkeypatch.setattr(metrics_collect, "MAX_SERIES", 2)
    text = generate_latest(broker_registry(lambda: status, BrokerMetrics())).decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert value(samples, "tokenhive_node_health", node="n1", health="degraded") == 1
    assert value(samples, "tokenhive_node_health", node="n1", health="ok") == 0
    assert value(samples, "tokenhive_node_health", node="n2", health="down") == 1
    assert value(samples, "tokenhive_node_draining", node="n2") == 1
    gpu0 = {"node": "n1", "gpu": "0", "name": "H200"}
    assert value(samples, "tokenhive_gpu_memory_used_bytes", **gpu0) == 1024 * 2**20
    assert value(samples, "tokenhive_gpu_memory_total_bytes", **gpu0) == 143771 * 2**20
    assert value(samples, "tokenhive_gpu_utilization_ratio", **gpu0) == 0.5
    assert ("tokenhive_gpu_utilization_ratio",
            frozenset({**gpu0, "gpu": "1"}.items())) not in samples  # NVML did not say
    w0 = {"worker": "w0", "model": "m", "node": "n1"}
    assert value(samples, "tokenhive_worker_decode_tokens_per_second", **w0) == 12.5
    assert value(samples, "tokenhive_worker_kv_cache_used_ratio", **w0) == 0.25
    assert value(samples, "tokenhive_worker_prefix_cache_hits_total", **w0) == 3
    assert value(samples, "tokenhive_queue_depth", model="m") == 4
    assert value(samples, "tokenhive_bad_frames_total") == 2
    assert value(samples, "tokenhive_auth_failures_total") == 1
    # 3 workers, 2 shown; 2 nodes fit; 2 GPUs fit: one series left out per worker family
    assert {lb["worker"] for (n, labels), _ in samples.items()
            if n == "tokenhive_worker_slots" for lb in [dict(labels)]} == {"w0", "w1"}
    assert value(samples, "tokenhive_metrics_series_dropped") == 1


@pytest.mark.timeout(10)
def test_token_rate_over_heartbeat_windows() -> None:
    rate = TokenRate()
    rate.total, rate.at = 0, 100.0
    assert rate.update(50, 100.5) == 100.0  # 50 tokens in half a second
    assert rate.update(60, 100.51) == 100.0  # an early heartbeat keeps the last rate
    assert rate.update(60, 101.5) == 10.0  # the 10 since 100.5, over a second
    assert rate.update(60, 102.5) == 0.0  # idle
    assert rate.update(5, 103.0) == 0.0  # the backend's count restarted: no negative rate
    assert rate.update(25, 104.0) == 20.0
