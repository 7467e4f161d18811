"""The gateway end to end: a pool file with groups, fallbacks, profiles and prices, run by
the real pool supervisor (a broker process and echo worker processes on ipc sockets), and
real clients. The failing model is an echo worker with ``fail`` set: a worker standing for
an upstream that is down, which a real upstream cannot be made to be on demand."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tokenhive.clients import NO_RETRY, AsyncClient, Client
from tokenhive.clients.pool.pool import PoolProcesses
from tokenhive.schemas.config import load_pool_config
from tokenhive.schemas.errors import BudgetExceeded, InvalidRequest
from tokenhive.schemas.messages import StatusReply

POOL = """
[broker]
clients = "ipc://{run}/c.sock"
workers = "ipc://{run}/w.sock"
fallback_wait = 0.3
cooldown_failures = 2
cooldown_window = 60
cooldown_s = 120

[groups.chat-default]
models = ["flaky", "steady"]

[models.small]
context_fallbacks = ["big"]

[profiles.planner]
model = "chat-default"
system = "You plan."
sampling = {{ max_tokens = 8 }}
tokens_per_minute = 12

[prices.steady]
input = 2.0
output = 10.0

[[workers]]
backend = "echo"
model = "flaky"
fail = "backend_unavailable"

[[workers]]
backend = "echo"
model = "steady"
text = "steady answer here"

[[workers]]
backend = "echo"
model = "small"
context_length = 3

[[workers]]
backend = "echo"
model = "big"
text = "big context"
"""


async def wait_status(client: AsyncClient, ok: Callable[[StatusReply], bool],
                      within: float = 30.0) -> StatusReply:
    deadline = time.monotonic() + within
    while True:
        status = await client.status(timeout=2.0)
        if ok(status):
            return status
        assert time.monotonic() < deadline, f"not reached in {within}s: {status}"
        await asyncio.sleep(0.05)  # polling the broker's status, not synchronising on time


def start_pool(tmp_path: Path) -> PoolProcesses:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_pool_config(POOL.format(run=run_dir))
    return PoolProcesses(config, run_dir=run_dir, log_level="warning")


async def serving(client: AsyncClient) -> None:
    await wait_status(client, lambda s: sum(w.health == "ok" for w in s.workers) == 4)


@pytest.mark.timeout(120)
def test_fallback_chain_cooldown_context_fallback_and_cost(tmp_path: Path) -> None:
    pool = start_pool(tmp_path)

    async def main() -> None:
        endpoints = await pool.start()
        try:
            async with AsyncClient(endpoints.clients, retry=NO_RETRY) as client:
                await serving(client)
                # 1. streamed, through the group: flaky fails before its first chunk, steady
                # serves; the client sees only steady's chunks and one final answer
                stream = client.stream("say it", model="chat-default")
                chunks = [c async for c in stream]
                result = stream.result
                assert result.text == "steady answer here"
                assert result.model == "steady" and result.tried == ["flaky"]
                assert [c.cumulative_tokens for c in chunks] == [1, 2, 3]
                assert result.usage.completion_tokens == 3
                usage = result.usage  # priced: $2 / $10 per million tokens
                expected = (usage.prompt_tokens * 2.0 + usage.completion_tokens * 10.0) / 1e6
                assert usage.cost_usd == pytest.approx(expected) and usage.cost_usd > 0

                # 2. a second failure puts flaky in cooldown: visible in status, and the
                # group's next request goes straight to steady
                again = await client.chat("again", model="chat-default")
                assert again.model == "steady" and again.tried == ["flaky"]
                status = await client.status()
                assert "flaky" in status.cooldowns and status.cooldowns["flaky"] > 100
                assert status.counters["fallbacks"] == 2 and status.counters["cooldowns"] == 1
                third = await client.chat("third", model="chat-default")
                assert third.model == "steady" and third.tried == []

                # 3. context_too_long goes to the context fallback, not back to the client
                long = await client.complete("one two three four five", model="small")
                assert long.text == "big context"
                assert long.model == "big" and long.tried == ["small"]

                status = await client.status()
                assert status.spend_by_model["steady"].requests == 3
                assert status.spend_by_model["steady"].cost_usd > 0
                assert status.spend_by_model["big"].cost_usd == 0.0  # local, unpriced
                assert status.groups == {"chat-default": ["flaky", "steady"]}
                assert status.counters["completed"] == 4 and status.counters["failed"] == 0

                # 4. `tokenhive status` shows the group, the cooldown and the spend tables
                shown = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "tokenhive.clients.cli.main", "status",
                     "--broker", endpoints.clients],
                    capture_output=True, text=True, timeout=60, check=True)
                lines = shown.stdout.splitlines()
                assert "groups: chat-default = flaky, steady" in lines
                assert any(line.startswith("cooling down: flaky (") for line in lines)
                (steady_row,) = [line for line in lines if line.startswith("steady ")]
                assert steady_row.split()[1] == "3"  # requests
        finally:
            await pool.stop(drain=2.0)

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_profiles_for_agents_and_a_budget_spent(tmp_path: Path) -> None:
    pool = start_pool(tmp_path)

    async def main() -> None:
        endpoints = await pool.start()
        try:
            async with AsyncClient(endpoints.clients, retry=NO_RETRY) as client:
                await serving(client)
                planner = client.for_agent("planner")  # no model: the profile names it
                first = await planner.chat("plan the day")
                assert first.model == "steady" and first.text == "steady answer here"
                # "You plan." + "plan the day" (5 words) + 3 tokens out = 8 of 12 per minute
                assert first.usage.total_tokens == 8

                def sync_call() -> None:
                    with Client(endpoints.clients, retry=NO_RETRY) as sync:
                        view = sync.for_agent("planner")
                        assert view.profile == "planner"
                        second = view.chat("and tomorrow")  # 16 of 12 now
                        assert second.model == "steady"
                        view.close()  # a view: the client it came from stays usable
                        assert sync.chat("direct", model="steady").text == "steady answer here"

                await asyncio.to_thread(sync_call)
                with pytest.raises(BudgetExceeded, match="tokens_per_minute=12") as spent:
                    await planner.chat("one more")
                assert not spent.value.retryable and spent.value.retry_after is not None
                # the same client without the profile is not limited by it
                assert (await client.chat("free", model="steady")).model == "steady"
                with pytest.raises(InvalidRequest, match="unknown profile 'coder'"):
                    await client.for_agent("coder").chat("hi", model="steady")
                status = await client.status()
                assert status.spend_by_profile["planner"].requests == 2
                assert status.counters["budget_exceeded"] == 1
        finally:
            await pool.stop(drain=2.0)

    asyncio.run(main())
