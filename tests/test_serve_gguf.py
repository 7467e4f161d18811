"""``tokenhive serve`` in front of real llama.cpp workers (the tiny random GGUF model):
streamed and plain completions agree token for token, the context limit is a 400, and an
embedding worker answers /v1/embeddings."""

from __future__ import annotations

import json
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

CONTEXT = 1024


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("serve-gguf")
    broker = start_broker(tmp, heartbeat_interval=0.2)
    # n_ctx 1024: tool definitions rendered as instructions take a few hundred tokens
    workers = [gguf_worker(broker.workers, tmp, "g0", path=str(tiny_gguf), slots=2,
                           n_ctx=CONTEXT),
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
        client.completions.create(model="tiny", prompt="x " * CONTEXT, max_tokens=5)
    assert info.value.code == "context_length_exceeded"


def test_embeddings_from_a_gguf_worker(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="tiny-embed", input=["hello world", "a cat"])
    assert [len(d.embedding) for d in r.data] == [N_EMBD, N_EMBD]
    assert all(math.isclose(math.hypot(*d.embedding), 1.0, abs_tol=1e-4) for d in r.data)
    assert r.usage.prompt_tokens > 0


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["paris", "rome"]}},
                   "required": ["city"], "additionalProperties": False}}}]
FORCED = {"type": "function", "function": {"name": "get_weather"}}
# The random-weights model lays JSON out with all the whitespace the grammar allows (a line
# break and up to 20 spaces between tokens): a short call still needs a few hundred tokens.
ROOM = 500


def test_forced_tool_call_plain_and_streamed(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "weather?"}]
    r = client.chat.completions.create(model="tiny", messages=ask, tools=WEATHER,  # type: ignore[arg-type]
                                       tool_choice=FORCED, max_tokens=ROOM)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments)["city"] in ("paris", "rome")  # type: ignore[union-attr]

    chunks = list(client.chat.completions.create(
        model="tiny", messages=ask, tools=WEATHER, tool_choice=FORCED,  # type: ignore[arg-type]
        max_tokens=ROOM, stream=True))
    pieces = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert pieces and pieces[0].id and pieces[0].function is not None
    assert pieces[0].function.name == "get_weather" and pieces[0].type == "function"
    assert {p.index for p in pieces} == {0}
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert json.loads(arguments)["city"] in ("paris", "rome")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # the call and its result go back as the next turn's messages
    turn = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {
            "name": "get_weather", "arguments": calls[0].function.arguments}}]},  # type: ignore[union-attr]
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
    after = client.chat.completions.create(model="tiny", messages=turn, tools=WEATHER,  # type: ignore[arg-type]
                                           tool_choice="none", max_tokens=4)
    assert after.choices[0].finish_reason == "length" and after.choices[0].message.content


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "yes or no?"}], max_tokens=ROOM,
        response_format={"type": "json_schema", "json_schema": {"name": "reply",
                                                                "schema": schema}})
    assert json.loads(r.choices[0].message.content or "")["answer"] in ("yes", "no")
