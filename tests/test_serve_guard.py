"""``tokenhive serve`` at its limits, against a real pool: bearer keys, body caps, the
request timeout, a full queue, and clients that hang up (their requests are cancelled all
the way to the worker's slot)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.serve import ServeProcess, wait_until
from tests.support.serve_pool import HEARTBEAT, SLOW_RATE, SLOW_TOKENS, EchoPool, echo_pool
from tests.support.worker_peers import start_worker

pytestmark = pytest.mark.timeout(60)

ENV_KEY = "sk-env-0123456789abcdef"
FILE_KEYS = ("sk-file-one-9876", "sk-file-two-5432")
BODY_CAP = 4096
REQUEST_TIMEOUT = 1.0
SLOW_SECONDS = SLOW_TOKENS / SLOW_RATE  # what a slow request takes when nobody cancels it


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoPool]:
    # queue_size=1: with the slow worker's one slot busy, one request waits, the next is refused
    with echo_pool(tmp_path_factory.mktemp("guard-pool"), queue_size=1) as p:
        yield p


@pytest.fixture(scope="module")
def strict(pool: EchoPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    workdir = tmp_path_factory.mktemp("strict")
    key_file = workdir / "keys.txt"
    key_file.write_text("# one key per line\n" + "\n".join(FILE_KEYS) + "\n")
    args = ["--broker", pool.address, "--port", "0", "--log-level", "debug",
            "--api-key-env", "TH_SERVE_KEY", "--api-key-file", str(key_file),
            "--max-body-bytes", str(BODY_CAP), "--request-timeout", str(REQUEST_TIMEOUT)]
    with ServeProcess(args, workdir, env={"TH_SERVE_KEY": ENV_KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def plain(pool: EchoPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with ServeProcess(["--broker", pool.address, "--port", "0"],
                      tmp_path_factory.mktemp("plain")) as s:
        yield s


def sdk(serve: ServeProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=serve.url + "/v1", api_key=key, max_retries=0)


def test_bearer_keys_from_env_and_file(strict: ServeProcess) -> None:
    user = [{"role": "user", "content": "let me in"}]
    for key in (ENV_KEY, *FILE_KEYS):
        with sdk(strict, key) as client:
            r = client.chat.completions.create(model="echo", messages=user)  # type: ignore[arg-type]
            assert r.choices[0].message.content == "let me in"
    for wrong in ("sk-wrong", ENV_KEY + "x", ENV_KEY[:-1]):
        with sdk(strict, wrong) as client, pytest.raises(openai.AuthenticationError) as info:
            client.models.list()
        assert info.value.code == "invalid_api_key" and wrong not in info.value.message
    with strict.http() as anonymous:
        assert anonymous.get("/health").status_code == 200  # probes need no key
        for path in ("/metrics", "/v1/models", "/v1/nowhere"):
            r = anonymous.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert r.json()["error"]["type"] == "authentication_error"
        assert anonymous.get("/metrics", headers={"Authorization": "Basic " + ENV_KEY}
                             ).status_code == 401
    with strict.http(FILE_KEYS[1]) as keyed:
        assert keyed.get("/metrics").status_code == 200
    cmdline = Path(f"/proc/{strict.pid}/cmdline").read_bytes().decode()
    logs = strict.stderr_text()
    assert "TH_SERVE_KEY" in cmdline
    assert all(k not in cmdline and k not in logs for k in (ENV_KEY, *FILE_KEYS))


def test_body_over_the_cap_is_413_with_or_without_content_length(strict: ServeProcess) -> None:
    def big_body() -> Iterator[bytes]:  # chunked upload: no Content-Length to judge by
        yield b'{"model": "echo", "prompt": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    with strict.http(ENV_KEY) as http:
        declared = http.post("/v1/completions", content=b"{" + b" " * BODY_CAP + b"}",
                             headers={"content-type": "application/json"})
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"
        started = time.monotonic()
        streamed = http.post("/v1/completions", content=big_body(),
                             headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "4096" in streamed.json()["error"]["message"]
        assert time.monotonic() - started < 10
        small = http.post("/v1/completions", content=iter([b'{"model": "echo", ',
                                                           b'"prompt": "fits"}']))
        assert small.status_code == 200 and small.json()["choices"][0]["text"] == "fits"


def test_request_timeout_is_504_and_frees_the_slot(strict: ServeProcess, pool: EchoPool) -> None:
    with sdk(strict, ENV_KEY) as client, pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="slow", prompt="tick")
    assert info.value.status_code == 504 and info.value.code == "timeout"
    pool.wait_idle("slow", 1, within=5.0)


def test_full_queue_is_503_with_retry_after(plain: ServeProcess, pool: EchoPool) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=plain.url, timeout=30) as http, \
                openai.AsyncOpenAI(base_url=plain.url + "/v1", api_key="x",
                                   max_retries=0) as client:
            body = {"model": "slow", "prompt": "tick", "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as holding:
                assert holding.status_code == 200
                events = holding.aiter_lines()  # kept: dropping it would close the response
                assert (await anext(events)).startswith("data: ")  # the slot is taken
                waiting = asyncio.create_task(http.post("/v1/completions", json={
                    "model": "slow", "prompt": "tock", "max_tokens": 2}))
                await asyncio.to_thread(wait_until, lambda: pool.status().queues.get("slow")
                                        == 1, 10.0, "one slow request queued")
                with pytest.raises(openai.APIStatusError) as info:
                    await client.completions.create(model="slow", prompt="one too many")
                assert info.value.status_code == 503 and info.value.code == "overloaded"
                assert info.value.response.headers["retry-after"] == "1"
            # hanging up on the first frees the slot for the one that waited
            answered = await waiting
            assert answered.status_code == 200
            assert answered.json()["choices"][0]["text"] == "tocktock"  # its one token twice

    asyncio.run(main())
    pool.wait_idle("slow", 1)


def test_hanging_up_mid_stream_cancels_to_the_worker_slot(
    plain: ServeProcess, pool: EchoPool
) -> None:
    pool.wait_idle("slow", 1)
    cancelled_before = pool.status().counters["cancelled"]
    with httpx.Client(base_url=plain.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "slow", "messages": [{"role": "user", "content": "tick"}],
                "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert pool.free_slots("slow") == 0  # generating for us
        closed = time.monotonic()  # leaving the block closed the connection mid-stream
    took = pool.wait_idle("slow", 1, within=SLOW_SECONDS)
    assert took < HEARTBEAT + 1.5, f"slot freed {took:.2f}s after the hang-up"
    assert time.monotonic() - closed < SLOW_SECONDS / 2  # cancelled, not run to the end
    assert pool.status().counters["cancelled"] == cancelled_before + 1


def test_hanging_up_while_waiting_for_a_plain_answer_cancels_too(
    plain: ServeProcess, pool: EchoPool
) -> None:
    pool.wait_idle("slow", 1)
    cancelled_before = pool.status().counters["cancelled"]
    with httpx.Client(base_url=plain.url, timeout=httpx.Timeout(30, read=0.5)) as http, \
            pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"model": "slow", "prompt": "tick"})
    took = pool.wait_idle("slow", 1, within=SLOW_SECONDS)
    assert took < HEARTBEAT + 1.5, f"slot freed {took:.2f}s after the hang-up"
    assert pool.status().counters["cancelled"] == cancelled_before + 1


def test_a_worker_dying_mid_stream_ends_it_with_an_error_event(
    plain: ServeProcess, pool: EchoPool, tmp_path: Path
) -> None:
    doomed = start_worker(pool.broker.workers, tmp_path, "--option", "tokens_per_s=20",
                          "--option", "tokens=200", model="doomed", worker_id="doomed-1",
                          slots=1, interval=HEARTBEAT)
    try:
        wait_until(lambda: any(w.model == "doomed" and w.health == "ok"
                               for w in pool.status().workers), 30, "doomed worker up")
        with httpx.Client(base_url=plain.url, timeout=30) as http, \
                http.stream("POST", "/v1/completions", json={
                    "model": "doomed", "prompt": "tick", "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            doomed.proc.kill()
            rest = [line for line in lines if line]
        assert "data: [DONE]" not in rest, "a cut-short stream must not look complete"
        error = json.loads(rest[-1].removeprefix("data: "))["error"]
        assert error["code"] == "worker_lost" and error["type"] == "server_error"
    finally:
        doomed.stop()
