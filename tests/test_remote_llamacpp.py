"""The OpenAI adapter against a real OpenAI-compatible server: llama-cpp-python's
(``python -m llama_cpp.server``) on Gemma 3 270M, started by the tests on free loopback
ports. Chat, completion, streaming, stop sequences, sampling extras, concurrency, cancel,
and embeddings from a second server started with ``--embedding``.

llama-cpp-python streams no usage (it ignores ``stream_options``), so these tests also
cover the estimated-usage path against a real server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.support.real_servers import ServerProcess, gemma_path, llama_cpp_python_server
from tokenhive.schemas.config import OpenAISpec
from tokenhive.schemas.errors import BackendError, InvalidRequest
from tokenhive.schemas.messages import Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.openai import OpenAIBackend

pytestmark = [pytest.mark.anyio, pytest.mark.gemma, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("lcpp")
    with llama_cpp_python_server(gemma_path(), logs, "--chat_format", "gemma") as server:
        yield server


def spec(url: str, **kw: object) -> OpenAISpec:
    kw.setdefault("slots", 4)
    return OpenAISpec(model="gemma", base_url=url + "/v1", timeout=60.0, **kw)  # type: ignore[arg-type]


async def started(s: OpenAISpec) -> OpenAIBackend:
    backend = make_backend(s)
    assert isinstance(backend, OpenAIBackend)
    await backend.start()
    return backend


def chat(text: str, **sampling: object) -> Request:
    sampling.setdefault("temperature", 0.0)
    return Request(id="r", model="gemma", messages=[Message("user", text)],
                   sampling=Sampling(**sampling))  # type: ignore[arg-type]


async def run(backend: OpenAIBackend, request: Request) -> tuple[str, list[Delta], Done]:
    items = [item async for item in backend.stream(request)]
    done = items[-1]
    assert isinstance(done, Done)
    deltas = [i for i in items[:-1] if isinstance(i, Delta)]
    assert len(deltas) == len(items) - 1
    return "".join(d.text for d in deltas), deltas, done


async def test_chat_stream_and_estimated_usage(chat_server: ServerProcess) -> None:
    backend = await started(spec(chat_server.url))
    try:
        text, deltas, done = await run(backend, chat("Name three colours.", max_tokens=12))
    finally:
        await backend.close()
    assert text.strip()
    assert done.finish_reason in ("stop", "length")
    assert done.usage.estimated  # llama-cpp-python sends no usage in streams
    assert done.usage.completion_tokens == len(deltas) <= 12
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


async def test_max_tokens_gives_length(chat_server: ServerProcess) -> None:
    backend = await started(spec(chat_server.url))
    try:
        _, deltas, done = await run(backend, chat("Tell me a long story.", max_tokens=3))
    finally:
        await backend.close()
    assert done.finish_reason == "length" and 1 <= len(deltas) <= 3


async def test_stop_sequence_cuts_generation(chat_server: ServerProcess) -> None:
    backend = await started(spec(chat_server.url))
    try:
        free, _, _ = await run(backend, chat("Count from one to ten in words.", max_tokens=24))
        words = free.split()
        assert len(words) >= 3, free
        stop = words[2]
        cut, _, done = await run(backend, chat("Count from one to ten in words.", max_tokens=24,
                                               stop=[stop]))
    finally:
        await backend.close()
    assert stop not in cut and free.startswith(cut.rstrip())
    assert done.finish_reason == "stop"


async def test_completion_with_every_sampling_field(chat_server: ServerProcess) -> None:
    # The server validates its fields (pydantic): every standard field and the llama.cpp
    # extras must be accepted. Their names are checked in test_remote_units.py. (Outputs
    # are not compared across calls: the server's prompt-prefix reuse changes the numerics
    # enough to flip near-tied argmaxes of this small quantized model.)
    backend = await started(spec(chat_server.url, sampling_extras="llama.cpp"))
    try:
        request = Request(id="c", model="gemma", kind=Kind.COMPLETION, prompt="Once upon a time",
                          sampling=Sampling(max_tokens=8, temperature=0.7, top_k=1, min_p=0.05,
                                            repeat_penalty=1.1, top_p=0.9, seed=7,
                                            presence_penalty=0.1, frequency_penalty=0.1))
        text, deltas, done = await run(backend, request)
    finally:
        await backend.close()
    assert text and len(deltas) <= 8 and done.finish_reason in ("stop", "length")


async def test_concurrent_streams_and_cancel(chat_server: ServerProcess) -> None:
    backend = await started(spec(chat_server.url, slots=4))
    results: dict[int, str] = {}
    try:
        # A stream abandoned after its first token must not wedge the server or the pool.
        gen = backend.stream(chat("Write a poem about the sea.", max_tokens=200))
        first = await gen.__anext__()  # type: ignore[attr-defined]
        assert isinstance(first, Delta)
        await gen.aclose()  # type: ignore[attr-defined]

        async def one(i: int) -> None:
            text, _, _ = await run(backend, Request(
                id=f"c{i}", model="gemma", kind=Kind.COMPLETION, prompt=f"Story {i}: Once upon",
                sampling=Sampling(max_tokens=6, temperature=0.0)))
            results[i] = text

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)
    finally:
        await backend.close()
    assert sorted(results) == [0, 1, 2, 3] and all(results.values())


async def test_wrong_path_is_invalid_request(chat_server: ServerProcess) -> None:
    backend = await started(spec(chat_server.url, chat_path="/no/such/endpoint"))
    try:
        with pytest.raises(InvalidRequest, match="HTTP 404"):
            await run(backend, chat("hi"))
    finally:
        await backend.close()


async def test_context_overflow_mid_stream_is_a_backend_error(
    tmp_path: Path,
) -> None:
    # llama-cpp-python checks the context only once the stream has started, and then just
    # ends the body: the adapter must report that instead of a truncated success.
    with llama_cpp_python_server(gemma_path(), tmp_path, "--chat_format", "gemma",
                                 "--n_ctx", "128") as server:
        backend = await started(spec(server.url))
        try:
            with pytest.raises(BackendError, match="ended before"):
                await run(backend, chat("word " * 300, max_tokens=4))
        finally:
            await backend.close()


@pytest.mark.parametrize("pooled", [True, False], ids=["server-pooled", "token-vectors"])
async def test_embeddings(tmp_path: Path, pooled: bool) -> None:
    # Gemma's GGUF names no pooling: without an override the server returns one vector per
    # token and the adapter mean-pools them; with it, the server pools.
    extra = ["--embedding", "true"]
    if pooled:
        extra += ["--kv_overrides", "gemma3.pooling_type=int:1"]
    with llama_cpp_python_server(gemma_path(), tmp_path, *extra) as server:
        backend = await started(spec(server.url))
        try:
            inputs = ["The cat sat on the mat.", "Stock markets fell sharply.", "The cat sat."]
            result = await backend.embed(
                Request(id="e", model="gemma", kind=Kind.EMBEDDING, input=inputs))
            again = await backend.embed(
                Request(id="e2", model="gemma", kind=Kind.EMBEDDING, input=inputs[:1]))
        finally:
            await backend.close()
    assert len(result.vectors) == 3 and {len(v) for v in result.vectors} == {640}
    assert again.vectors[0] == pytest.approx(result.vectors[0], rel=1e-4, abs=1e-5)
    assert result.vectors[0] != pytest.approx(result.vectors[1], rel=1e-3)
    assert result.usage.prompt_tokens > 0 and not result.usage.estimated
