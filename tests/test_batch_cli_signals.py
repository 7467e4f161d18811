"""``tokenhive batch`` as a user meets it: Ctrl-C mid-run and a second run on the same output.

Real processes throughout: a broker and a slow echo worker (so a run is reliably mid-way when
the test acts), ``tokenhive batch`` as a subprocess that gets a real SIGINT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Proc, start_broker
from tests.support.worker_peers import WorkerProc, start_worker
from tests.test_batch import wait_models

LINES = 24


@pytest.fixture
def slow_broker(tmp_path: Path) -> Iterator[str]:
    """A broker with one echo worker of model m: 4 slots, 10 tokens/s (an 8-token line takes
    0.8 s, so 24 lines take 10 s at concurrency 2: time for the test to act mid-run)."""
    proc: Proc = start_broker(tmp_path, heartbeat_interval=0.2)
    worker: WorkerProc = start_worker(proc.workers, tmp_path, "--option", "tokens_per_s=10",
                                      model="m", worker_id="slow", slots=4)
    try:
        wait_models(proc.clients, {"m"})
        yield proc.clients
    finally:
        worker.stop()
        proc.terminate()


def eight_tokens(cid: str) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "m", "prompt": f"{cid} a b c d e f g", "max_tokens": 8}})


def start_batch(source: Path, out: Path, broker: str, log: Path,
                concurrency: int = 2) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tokenhive.clients.cli.main", "batch", str(source),
             "-o", str(out), "--broker", broker, "--no-progress",
             "--concurrency", str(concurrency)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not out.exists() or len(out.read_text().splitlines()) < n:
        assert proc.poll() is None, "tokenhive batch ended before the test could interrupt it"
        assert time.monotonic() < deadline, f"no {n} lines in {out} within {timeout}s"
        time.sleep(0.02)  # polling interval


@pytest.mark.timeout(120)
def test_ctrl_c_stops_cleanly_a_second_run_is_refused_and_a_rerun_resumes(
    tmp_path: Path, slow_broker: str
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(eight_tokens(f"c-{i}") for i in range(LINES)))
    first_log = tmp_path / "first.stderr"
    first = start_batch(source, out, slow_broker, first_log)
    try:
        wait_for_lines(out, 2, first, timeout=60)

        # a second run on the same output while the first writes it: refused at once
        second_log = tmp_path / "second.stderr"
        second = start_batch(source, out, slow_broker, second_log)
        assert second.wait(timeout=60) == 2
        assert first.poll() is None, "the first run ended before the test could interrupt it"
        refusal = second_log.read_text()
        assert "being written by another tokenhive batch" in refusal
        assert f"{out}.lock" in refusal

        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stderr = first_log.read_text()
    assert "Task exception was never retrieved" not in stderr and "Traceback" not in stderr
    summary = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(summary) == 1, stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]  # all whole lines
    assert all(line["response"]["status_code"] == 200 for line in written)
    n = len(written)
    assert summary[0] == (f"tokenhive batch: interrupted: {n} succeeded, 0 failed, "
                          f"{LINES - n} not run; rerun to resume")
    assert 2 <= n < LINES

    rerun = start_batch(source, out, slow_broker, tmp_path / "rerun.stderr", concurrency=4)
    assert rerun.wait(timeout=60) == 0
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"c-{i}" for i in range(LINES))  # each exactly once
    assert f"{LINES - n} succeeded, 0 failed, {n} already done" in (
        tmp_path / "rerun.stderr").read_text()
