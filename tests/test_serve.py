"""``tokenhive serve`` against a real pool (broker and echo workers as processes), driven by
the official ``openai`` client (sync and async), raw httpx and curl."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.serve import ServeProcess
from tests.support.serve_pool import ECHO_CONTEXT, EchoPool, echo_pool
from tokenhive.workers.backends.echo import vector_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoPool]:
    with echo_pool(tmp_path_factory.mktemp("serve-pool")) as p:
        yield p


@pytest.fixture(scope="module")
def serve(pool: EchoPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with ServeProcess(["--broker", pool.address, "--port", "0", "--log-level", "info"],
                      tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture
def oai(serve: ServeProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def http(serve: ServeProcess) -> Iterator[httpx.Client]:
    with serve.http() as client:
        yield client


def test_chat_plain_and_streamed_with_the_sync_client(oai: openai.OpenAI) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hello big world"}]
    r = oai.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "echo"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "hello big world"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 3, 8)

    chunks = list(oai.chat.completions.create(
        model="echo", messages=messages, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "hello big world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_and_streamed_with_the_async_client(serve: ServeProcess) -> None:
    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=serve.url + "/v1", api_key="unused",
                                      max_retries=0) as client:
            r = await client.completions.create(model="echo", prompt="one two three four",
                                                max_tokens=2)
            assert r.object == "text_completion" and r.choices[0].text == "one two"
            assert r.choices[0].finish_reason == "length"
            stream = await client.completions.create(
                model="echo", prompt="one two three four", stop=[" three"], stream=True)
            parts = [c async for c in stream]
            assert "".join(c.choices[0].text for c in parts) == "one two"
            assert parts[-1].choices[0].finish_reason == "stop"
            many = await asyncio.gather(*(client.completions.create(
                model="echo", prompt=f"request {i}") for i in range(8)))
            assert [m.choices[0].text for m in many] == [f"request {i}" for i in range(8)]

    asyncio.run(main())


def test_sampling_fields_are_accepted_and_honoured(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="echo", messages=[{"role": "developer", "content": "x"},
                                {"role": "user", "content": "a b c d e"}],
        max_completion_tokens=3, max_tokens=1, temperature=0.5, top_p=0.9, seed=7,
        presence_penalty=0.1, frequency_penalty=0.2, stop="zzz", user="someone", n=1,
        extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1},
    )
    # max_completion_tokens wins over the older max_tokens, as at OpenAI
    assert r.choices[0].message.content == "a b c" and r.choices[0].finish_reason == "length"


def test_embeddings_float_and_base64(oai: openai.OpenAI) -> None:
    inputs = ["a b", "c"]
    floats = oai.embeddings.create(model="echo", input=inputs, encoding_format="float")
    assert [d.embedding for d in floats.data] == [vector_for(t, 8) for t in inputs]
    assert [d.index for d in floats.data] == [0, 1] and floats.usage.prompt_tokens == 3
    # the SDK asks for base64 by default and decodes the little-endian float32 itself
    packed = oai.embeddings.create(model="echo", input="a b")
    assert packed.data[0].embedding == pytest.approx(vector_for("a b", 8), abs=1e-6)


def test_models_come_from_the_live_pool(oai: openai.OpenAI, http: httpx.Client) -> None:
    assert sorted(m.id for m in oai.models.list()) == ["echo", "slow"]
    assert oai.models.retrieve("slow").owned_by == "tokenhive"
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["healthy_workers"] == 2


def test_errors_have_the_sdk_classes_and_fields(oai: openai.OpenAI) -> None:
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(model="gpt-4o", messages=user)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found" and "gpt-4o" in not_found.value.message
    with pytest.raises(openai.NotFoundError):  # a stream is refused before its 200 too
        oai.chat.completions.create(model="gpt-4o", messages=user, stream=True)  # type: ignore[arg-type]
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"temperature": 3.0}, "temperature", "invalid_value"),
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
         "tools[0].function.name", "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
         "invalid_value"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "invalid_value"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
        ({"seed": -1}, "seed", "invalid_value"),
        ({"extra_body": {"colour": "red"}}, "colour", "unknown_parameter"),
    ]
    for extra, param, code in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            oai.chat.completions.create(model="echo", messages=user, **extra)  # type: ignore[call-overload]
        assert (bad.value.param, bad.value.code) == (param, code), extra
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.completions.create(model="echo", prompt="word " * (ECHO_CONTEXT + 1))
    assert too_long.value.code == "context_length_exceeded"
    # the refusals changed nothing: the next request is answered
    ok = oai.chat.completions.create(model="echo", messages=user)  # type: ignore[arg-type]
    assert ok.choices[0].message.content == "hi"


def test_sse_framing_on_the_wire(http: httpx.Client) -> None:
    body = {"model": "echo", "prompt": "x y z", "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("\n\ndata: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"text_completion"}
    assert len({p["id"] for p in payloads}) == 1
    assert [p["choices"][0]["text"] for p in payloads[:-1]] == ["x", " y", " z", ""]
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]] == [None] * 3 + ["stop"]
    assert [p["usage"] for p in payloads[:-1]] == [None] * 4
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(("path", "content", "param", "code"), [
    ("/v1/chat/completions", b'{"model": "echo", "messages": [', None, "invalid_json"),
    ("/v1/chat/completions", b"", None, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", None, "invalid_type"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "model",
     "missing_required_parameter"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": "hi"}', "messages",
     "invalid_type"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": [{"role": "user", "content": 5}]}',
     "messages[0].content", "invalid_type"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": [{"role": "robot", "content": ""}]}',
     "messages[0].role", "invalid_value"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": [{"role": "user", "content": '
     b'[{"type": "image_url", "image_url": {"url": "x"}}]}]}', "messages[0].content[0]",
     "unsupported_parameter"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": [{"role": "assistant", "content": '
     b'null, "tool_calls": [{"id": "c1", "type": "function"}]}]}',
     "messages[0].tool_calls[0].function", "missing_required_parameter"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": [{"role": "user", "content": null}]}',
     "messages[0].content", "invalid_type"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": [], "max_tokens": "9"}',
     "max_tokens", "invalid_type"),
    ("/v1/chat/completions", b'{"model": "echo", "messages": [{"role": "user", "content": "x"}],'
     b' "stream_options": {"include_usage": true}}', "stream_options", "invalid_value"),
    ("/v1/completions", b'{"model": "echo", "prompt": [1, 2, 3]}', "prompt", "invalid_type"),
    ("/v1/completions", b'{"model": "echo", "prompt": ["a", "b"]}', "prompt",
     "unsupported_parameter"),
    ("/v1/embeddings", b'{"model": "echo", "input": [[1, 2]]}', "input[0]", "invalid_type"),
    ("/v1/embeddings", b'{"model": "echo", "input": "x", "encoding_format": "int8"}',
     "encoding_format", "invalid_value"),
    ("/v1/embeddings", b'{"model": "echo", "input": "x", "dimensions": 4}', "dimensions",
     "unsupported_parameter"),
])
def test_bad_bodies_get_400_naming_the_field(
    http: httpx.Client, path: str, content: bytes, param: str | None, code: str
) -> None:
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert (error["param"], error["code"], error["type"]) == (param, code,
                                                              "invalid_request_error")
    assert error["message"]


def test_unknown_routes_and_methods_in_the_error_shape(http: httpx.Client) -> None:
    r = http.get("/v1/engines")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(serve: ServeProcess) -> None:
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "from curl"}]})
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{serve.url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    text, status = out.rsplit("\n", 1)
    assert status == "200"
    assert json.loads(text)["choices"][0]["message"]["content"] == "from curl"


def samples(http: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_match_what_the_run_did(oai: openai.OpenAI, http: httpx.Client) -> None:
    def value(snapshot: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
              **labels: str) -> float:
        return snapshot.get((name, frozenset(labels.items())), 0.0)

    before = samples(http)
    for _ in range(2):
        oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b c"}])
    list(oai.completions.create(model="echo", prompt="p q r s", max_tokens=2, stream=True))
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="echo", prompt="x", temperature=9)
    after = samples(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "tokenhive_http_requests_total"
    assert delta(requests, endpoint="chat", model="echo", outcome="ok") == 2
    assert delta(requests, endpoint="completions", model="echo", outcome="ok") == 1
    assert delta(requests, endpoint="completions", model="_unknown", outcome="unknown_model") == 1
    # refused while reading the body: no model label is trusted yet
    assert delta(requests, endpoint="completions", model="_none",
                 outcome="invalid_request") == 1
    assert delta("tokenhive_http_completion_tokens_total", model="echo") == 3 + 3 + 2
    assert delta("tokenhive_http_prompt_tokens_total", model="echo") == 3 + 3 + 4
    assert delta("tokenhive_http_ttft_seconds_count", model="echo") == 3
    assert delta("tokenhive_http_inter_token_seconds_count", model="echo") == 1  # 2 chunks
    assert delta("tokenhive_http_request_seconds_count", endpoint="chat", model="echo") == 2
    assert delta("tokenhive_http_queue_wait_seconds_count", model="echo") == 3
    assert value(after, "tokenhive_http_in_flight") == 0
    assert value(after, "tokenhive_pool_up") == 1
    slow = {"worker": "slow-1", "model": "slow", "backend": "echo"}
    assert value(after, "tokenhive_pool_worker_slots", **slow) == 1
    assert value(after, "tokenhive_pool_worker_healthy", **slow) == 1
    assert value(after, "tokenhive_broker_events_total", event="unknown_model") >= 1


