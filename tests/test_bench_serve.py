"""bench.serve's parts: the seeded workload, the metrics, and its load drivers against real
peers (a pool of broker + echo worker processes; the bench's own paced SSE upstream process)."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.serve_load import closed_loop, open_loop
from bench.serve_metrics import SLO, Record, percentile, summarize
from bench.serve_report import ceiling, compare
from bench.serve_systems import OpenAIHTTPSystem, PoolSystem
from bench.serve_workload import Shape, WorkloadError, arrivals, load_prompts, make_items
from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import EchoSpec, PoolConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(10)
def test_workload_is_seeded_and_shaped() -> None:
    shape = Shape(output_len=20, range_ratio=0.5, synthetic_fraction=0.5,
                  synthetic_input_len=10)
    a = make_items(200, 4.0, shape, seed=7)
    assert a == make_items(200, 4.0, shape, seed=7)
    assert a != make_items(200, 4.0, shape, seed=8)
    assert all(10 <= it.max_tokens <= 30 for it in a)
    assert len({it.prompt for it in a}) == 200  # distinct: no cross-request prefix cache
    shipped = set(load_prompts())
    from_file = [it for it in a if it.prompt.split("] ", 1)[1] in shipped]
    assert 60 < len(from_file) < 140  # about half synthetic
    assert [it.arrival for it in a] == sorted(it.arrival for it in a)
    assert a[0].arrival == 0.0


@pytest.mark.timeout(10)
def test_poisson_arrivals_have_the_asked_rate_and_a_burst_is_all_at_zero() -> None:
    gaps = np.diff(arrivals(20_000, 5.0, random.Random(1)))
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.05)  # exponential: sd = mean
    assert arrivals(5, math.inf, random.Random(1)) == [0.0] * 5


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bad", [dict(output_len=0), dict(range_ratio=1.0),
                                 dict(synthetic_fraction=1.5), dict(synthetic_input_len=0)])
def test_bad_workload_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(WorkloadError):
        make_items(3, 1.0, Shape(**bad), seed=0)  # type: ignore[arg-type]
    with pytest.raises(WorkloadError):
        arrivals(3, 0.0, random.Random(0))


@pytest.mark.timeout(10)
def test_percentile_matches_numpy_and_summary_computes_tpot_and_goodput() -> None:
    values = [random.Random(3).random() for _ in range(37)]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    fast = Record(start=0.0, ttft=0.1, end=1.0, output_tokens=10, itl=[0.1] * 9)
    slow = Record(start=0.5, ttft=0.9, end=3.4, output_tokens=11, itl=[0.25] * 10)
    failed = Record(start=1.0, error="BackendError: boom")
    s = summarize("x", "rate=1/s", [fast, slow, failed], 0.0, SLO(ttft_ms=500, tpot_ms=200),
                  offered_rate=1.0)
    assert (s.completed, s.failed, s.duration_s) == (2, 1, 3.4)
    assert s.request_throughput == pytest.approx(2 / 3.4, abs=1e-3)
    assert s.output_throughput == pytest.approx(21 / 3.4, abs=0.1)
    assert s.goodput == pytest.approx(1 / 3.4, abs=1e-3)  # slow: TTFT 900 ms > 500
    assert s.tpot_ms["p50"] == pytest.approx((100 + 200) / 2)  # 0.9/9 and (2.9-0.9)/10
    assert s.errors == ["BackendError: boom"]


@pytest.mark.timeout(10)
def test_ceiling_is_where_p99_doubles_and_compare_gives_ratios() -> None:
    def row(system: str, rate: float, p99: float, tok_s: float, req_s: float):
        rec = [Record(start=0.0, ttft=p99 / 2e3, end=p99 / 1e3, output_tokens=4)]
        s = summarize(system, f"rate={rate:g}/s", rec, 0.0, SLO(1e9, 1e9), offered_rate=rate)
        s.output_throughput, s.request_throughput = tok_s, req_s
        return s

    rows = [row("pool", 10, 10, 100, 10), row("pool", 20, 21, 200, 19),  # a noisy p99
            row("pool", 40, 15, 390, 39), row("pool", 80, 25, 780, 79),
            row("pool", 160, 90, 900, 90), row("base", 10, 8, 125, 10)]
    c = ceiling(rows, "pool")
    assert c is not None and c["doubled_at_offered_rate"] == 80  # and stays doubled
    assert c["last_below"]["offered_rate"] == 40  # type: ignore[index]
    assert c["saturated_at_offered_rate"] == 160 and c["max_achieved_req_s"] == 90
    [r] = compare(rows, "pool", "base")
    assert r["throughput_ratio"] == 0.8 and r["added_ttft_p50_ms"] == 1.0


@pytest.mark.timeout(60)
def test_open_and_closed_loop_against_a_real_echo_pool() -> None:
    """Every request gets exactly its max_tokens (echo with a fixed long script), the
    arrival schedule is kept, and the closed loop never has more than N in flight."""
    items = make_items(12, 40.0, Shape(output_len=6), seed=3)

    async def run() -> None:
        spec = EchoSpec(model="bench", slots=4, tokens=1000)
        async with (local_pool(PoolConfig(workers=[spec])) as pool,
                    AsyncClient(pool.address, model="bench", timeout=30) as client):
            system = PoolSystem("pool", client, "completion")
            t0, records = await open_loop(system.send, items)
            for item, rec in zip(items, records, strict=True):
                assert rec.ok, rec.error
                assert rec.output_tokens == item.max_tokens
                assert rec.start - t0 >= item.arrival - 1e-3
                assert len(rec.itl) <= item.max_tokens - 1 and 0 < rec.ttft <= rec.e2e
            in_flight = 0
            peak = 0

            async def counted(item):  # type: ignore[no-untyped-def]
                nonlocal in_flight, peak
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await system.send(item)
                finally:
                    in_flight -= 1

            _, closed = await closed_loop(counted, items, 3)
            assert len(closed) == 12 and all(r.ok for r in closed)
            assert peak == 3

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_http_system_times_each_sse_event_from_a_real_paced_upstream() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.remote", "--serve", "--tokens", "5", "--token-rate", "200"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())

        async def run() -> list[Record]:
            system = OpenAIHTTPSystem("up", f"http://127.0.0.1:{port}", "chat", 4)
            try:
                return list(await asyncio.gather(
                    *(system.send(it) for it in make_items(4, math.inf, Shape(), seed=0))))
            finally:
                await system.aclose()

        for rec in asyncio.run(run()):
            assert rec.ok, rec.error
            assert rec.output_tokens == 5  # the upstream's usage count
            assert len(rec.itl) == 4
            # paced 5 ms apart: the first and last text events are >= 4 intervals apart
            assert sum(rec.itl) >= 0.015
    finally:
        server.terminate()
        server.wait(timeout=10)
