"""``tokenhive serve`` in front of real llama.cpp workers (the tiny random GGUF model):
streamed and plain completions agree token for token, the context limit is a 400, and an
embedding worker answers /v1/embeddings."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.procs import start_broker
from tests.support.serve import ServeProcess, wait_until
from tests.support.tiny_gguf import N_EMBD
from tests.test_gguf_pool import gguf_worker
from tokenhive.clients import Client

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("serve-gguf")
    broker = start_broker(tmp, heartbeat_interval=0.2)
    workers = [gguf_worker(broker.workers, tmp, "g0", path=str(tiny_gguf), slots=2),
               gguf_worker(broker.workers, tmp, "e0", path=str(tiny_gguf), model="tiny-embed",
                           embedding=True)]
    try:
        with Client(broker.clients) as status:
            wait_until(lambda: sum(w.health == "ok" for w in status.status().workers) == 2, 90,
                       "both gguf workers healthy")
        with ServeProcess(["--broker", broker.clients, "--port", "0"], tmp) as serve, \
                openai.OpenAI(base_url=serve.url + "/v1", api_key="x", max_retries=0) as oai:
            yield oai
    finally:
        for w in workers:
            w.stop()
        broker.terminate()


def test_streamed_completion_matches_the_plain_one(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="tiny", prompt="hello world", max_tokens=8,
                                      temperature=0)
    assert plain.usage is not None and plain.usage.completion_tokens == 8
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="hello world", max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(text_chunks) > 1, "tokens arrive as they are generated"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_chat_stream_and_context_limit(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        seed=3)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x " * 300, max_tokens=5)
    assert info.value.code == "context_length_exceeded"


def test_embeddings_from_a_gguf_worker(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="tiny-embed", input=["hello world", "a cat"])
    assert [len(d.embedding) for d in r.data] == [N_EMBD, N_EMBD]
    assert all(math.isclose(math.hypot(*d.embedding), 1.0, abs_tol=1e-4) for d in r.data)
    assert r.usage.prompt_tokens > 0
