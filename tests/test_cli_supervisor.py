"""The supervisor behind ``tokenhive up`` and local pools, with real child processes."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from pathlib import Path

import pytest

from tokenhive.clients.pool.supervisor import ProcessSpec, Replica, State, Supervisor


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def wait_until(sup: Supervisor, cond: object, within: float = 20.0) -> None:
    """Wait on the supervisor's change event until ``cond()`` holds."""
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        left = deadline - time.monotonic()
        assert left > 0, "condition not reached"
        sup.changed.clear()
        try:
            await asyncio.wait_for(sup.changed.wait(), left)
        except TimeoutError:
            pass


@pytest.mark.timeout(60)
def test_crashing_child_is_restarted_with_growing_backoff() -> None:
    starts: list[float] = []

    def seen(replica: Replica) -> None:
        if replica.state is State.RUNNING:
            starts.append(time.monotonic())

    async def main() -> None:
        sup = Supervisor(backoff_base=0.1, backoff_max=0.8, stable_after=30.0, on_change=seen)
        replica = sup.start(ProcessSpec(name="crasher", argv=python("raise SystemExit(1)")))
        await wait_until(sup, lambda: replica.starts >= 5)
        await sup.stop()
        assert replica.state is State.STOPPED and replica.last_exit in (1, -15)  # 5th: stopped

    asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # delays 0.1, 0.2, 0.4, 0.8 (+ process start time): each wait at least its backoff
    assert all(gap >= want * 0.8 for gap, want in zip(gaps, [0.1, 0.2, 0.4, 0.8], strict=False))
    assert gaps[3] > gaps[0]


@pytest.mark.timeout(30)
def test_exit_3_means_model_load_failed_and_is_not_restarted() -> None:
    async def main() -> None:
        sup = Supervisor(backoff_base=0.01)
        replica = sup.start(ProcessSpec(name="bad-model", argv=python("raise SystemExit(3)")))
        await wait_until(sup, lambda: replica.state is State.GAVE_UP)
        assert replica.starts == 1 and replica.reason == "model load failed"
        await sup.stop()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ignoring-sigterm"
    stubborn = python(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "while True: time.sleep(1)\n"
    )

    async def main() -> float:
        sup = Supervisor()
        replica = sup.start(ProcessSpec(name="stubborn", argv=stubborn))
        deadline = time.monotonic() + 20
        while not ready.exists():  # the child's handler is installed once the file is there
            assert time.monotonic() < deadline, "child never got ready"
            await asyncio.sleep(0.02)  # polling interval
        started = time.monotonic()
        await sup.stop(grace=0.5)
        assert replica.state is State.STOPPED and replica.last_exit == -9
        return time.monotonic() - started

    assert 0.5 <= asyncio.run(main()) < 5.0


@pytest.mark.timeout(30)
def test_stop_during_backoff_returns_at_once() -> None:
    async def main() -> float:
        sup = Supervisor(backoff_base=30.0, backoff_max=30.0)
        replica = sup.start(ProcessSpec(name="crasher", argv=python("raise SystemExit(1)")))
        await wait_until(sup, lambda: replica.state is State.BACKOFF)
        started = time.monotonic()
        await sup.stop()
        return time.monotonic() - started

    assert asyncio.run(main()) < 2.0


@pytest.mark.timeout(30)
def test_env_reaches_the_child() -> None:
    async def main() -> int | None:
        sup = Supervisor()
        code = "import os; raise SystemExit(3 if os.environ['CUDA_VISIBLE_DEVICES'] == '1' else 1)"
        replica = sup.start(ProcessSpec(name="env", argv=python(code),
                                        env={"CUDA_VISIBLE_DEVICES": "1"}))
        await wait_until(sup, lambda: replica.state is State.GAVE_UP)
        await sup.stop()
        return replica.last_exit

    assert asyncio.run(main()) == 3


SIGILL_SELF = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


@pytest.mark.timeout(60)
def test_a_child_crashing_before_ready_is_named_and_given_up_after_k_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real SIGILL (the process signals itself, as a llama.cpp built for other CPU features
    would at its first decode): the log says so in words, and after ``crash_limit`` runs that
    never got ready the replica is given up with that reason instead of restarting forever."""

    async def main() -> Replica:
        sup = Supervisor(backoff_base=0.01, crash_limit=3)
        replica = sup.start(ProcessSpec(name="worker[0.0]:m", argv=python(SIGILL_SELF),
                                        ready_file=str(tmp_path / "ready")))
        await wait_until(sup, lambda: replica.state is State.GAVE_UP)
        await sup.stop()
        return replica

    replica = asyncio.run(main())
    assert replica.starts == 3 and replica.last_exit == -4
    assert replica.reason.startswith(
        "worker crashed: SIGILL (illegal instruction) before it was ready, 3 times in a row; "
        "llama.cpp was built for CPU features")
    assert "see README, Troubleshooting" in replica.reason
    crashes = [r.getMessage() for r in caplog.records if "crashed: SIGILL" in r.getMessage()]
    assert crashes and "illegal instruction" in crashes[0]


@pytest.mark.timeout(60)
def test_crashes_after_getting_ready_keep_restarting(tmp_path: Path) -> None:
    """A child that got ready before it crashed served: it is restarted, not given up."""
    ready = tmp_path / "ready"
    code = f"import pathlib; pathlib.Path({str(ready)!r}).touch(); {SIGILL_SELF}"

    async def main() -> Replica:
        sup = Supervisor(backoff_base=0.01, backoff_max=0.05, crash_limit=2)
        replica = sup.start(ProcessSpec(name="w", argv=python(code), ready_file=str(ready)))
        await wait_until(sup, lambda: replica.starts >= 4)
        state = replica.state
        await sup.stop()
        assert state is not State.GAVE_UP
        return replica

    replica = asyncio.run(main())
    assert replica.crashes_before_ready == 0


@pytest.mark.timeout(30)
def test_spec_goes_to_stdin_not_argv() -> None:
    """Worker specs can carry headers and env values: argv is world-readable, stdin is not."""
    secret = b'{"backend": "echo", "headers": {"X-Key": "s3cret"}}'
    code = ("import sys, pathlib; data = sys.stdin.buffer.read(); "
            "cmd = pathlib.Path('/proc/self/cmdline').read_bytes(); "
            "raise SystemExit(0 if data.startswith(b'{') and data not in cmd else 9)")

    async def main() -> Replica:
        sup = Supervisor(backoff_base=5.0)
        replica = sup.start(ProcessSpec(name="w", argv=python(code), stdin=secret))
        await wait_until(sup, lambda: replica.last_exit is not None)
        await sup.stop()
        return replica

    assert asyncio.run(main()).last_exit == 0
