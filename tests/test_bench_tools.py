"""The benches' own tools: per-process CPU accounting, and bench.broker's end-to-end run
through a real broker, echo worker and client processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.broker_e2e import run_e2e
from bench.cpu import cpu_seconds, delta, descendants, snapshot

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n" \
       "print('done', flush=True)\ntime.sleep(60)\n"


@pytest.mark.timeout(30)
def test_cpu_of_a_descendant_is_counted_and_a_gone_process_is_left_out() -> None:
    child = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.pid in descendants()
        before = snapshot([child.pid])
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        spent = delta(before, snapshot([child.pid]))
        assert 0.25 <= spent < 5.0
    finally:
        child.kill()
        child.wait(timeout=10)
    assert cpu_seconds(child.pid) is None
    assert snapshot([child.pid]) == {}
    assert delta(before, {}) == 0.0


@pytest.mark.timeout(90)
def test_broker_end_to_end_counts_every_chunk_of_every_client() -> None:
    e2e = run_e2e(clients=2, concurrency=2, requests=6, tokens=8)
    assert e2e.requests_per_s > 0 and e2e.chunks_per_s == pytest.approx(
        e2e.requests_per_s * 8)  # every request streamed its 8 chunks (asserted per client)
    assert set(e2e.cpu) == {"broker", "worker", "clients"}
    assert all(us >= 0 for us, _ in e2e.cpu.values())  # /proc counts in 10 ms ticks
    assert e2e.cpu["clients"][0] > 0
