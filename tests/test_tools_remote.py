"""Tools and structured output through the remote adapters, each in its API's own shape.

OpenAI / Azure and Anthropic run against tests/support/fake_http.py: no hosted API is
reachable from tests, so the fake replays the documented wire shapes (OpenAI's streamed
``tool_calls`` deltas; Anthropic's ``tool_use`` blocks and ``input_json_delta`` events) and the
tests check what the adapter sends and what it makes of the answers. The OpenAI shape also
runs against a real server: llama-cpp-python's (``python -m llama_cpp.server``) on Gemma 3
270M, which forces a named tool with a grammar and streams the call as deltas.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from tests.support.fake_http import FakeHTTPServer, json_reply, sse, sse_reply
from tests.support.real_servers import ServerProcess, gemma_path, llama_cpp_python_server
from tokenhive.schemas.config import AnthropicSpec, AzureSpec, OpenAISpec
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Message, Request, Sampling
from tokenhive.schemas.tools import (
    FunctionCall,
    FunctionDef,
    JSONSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallAssembler,
    ToolChoiceFunction,
)
from tokenhive.workers.backend import Backend, Delta, Done
from tokenhive.workers.backends import make_backend

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
KEY_ENV = "TH_TEST_TOOLS_KEY"

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"]}
TOOLS = [Tool(FunctionDef("get_weather", "Weather now", WEATHER)),
         Tool(FunctionDef("get_time", None, {"type": "object", "properties": {
             "tz": {"type": "string"}}}))]
HISTORY = [
    Message("system", "Be brief."),
    Message("user", "Weather in Oslo and the time?"),
    Message("assistant", "Checking.", tool_calls=[
        ToolCall("call_a", FunctionCall("get_weather", '{"city": "Oslo"}')),
        ToolCall("call_b", FunctionCall("get_time", "{}"))]),
    Message("tool", "4C", tool_call_id="call_a"),
    Message("tool", "12:00", tool_call_id="call_b"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHTTPServer]:
    monkeypatch.setenv(KEY_ENV, "test-key")
    with FakeHTTPServer() as server:
        yield server


async def run(backend: Backend, request: Request) -> tuple[str, list[ToolCall], Done, int]:
    """(text, assembled tool calls, Done, deltas carrying calls)."""
    await backend.start()
    try:
        items = [item async for item in backend.stream(request)]
    finally:
        await backend.close()
    done = items[-1]
    assert isinstance(done, Done)
    deltas = [i for i in items[:-1] if isinstance(i, Delta)]
    assert len(deltas) == len(items) - 1
    calls = ToolCallAssembler()
    for d in deltas:
        calls.add(d.tool_calls or [])
    return ("".join(d.text for d in deltas), calls.calls(), done,
            sum(1 for d in deltas if d.tool_calls))


def request(messages: list[Message] | None = None, **kw: Any) -> Request:
    return Request(id="r", model="m", messages=messages or [Message("user", "hi")], **kw)


# --- OpenAI and Azure -----------------------------------------------------------------------


def tool_chunk(index: int, *, id: str | None = None, name: str | None = None,
               args: str | None = None) -> dict[str, Any]:
    fn: dict[str, Any] = {}
    if name is not None:
        fn["name"] = name
    if args is not None:
        fn["arguments"] = args
    call: dict[str, Any] = {"index": index, "function": fn}
    if id is not None:
        call.update(id=id, type="function")
    return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}


OPENAI_TOOL_STREAM = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
    tool_chunk(0, id="call_1", name="get_weather", args=""),
    tool_chunk(0, args='{"ci'), tool_chunk(0, args='ty": "Oslo"}'),
    tool_chunk(1, id="call_2", name="get_time", args="{}"),
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}},
    done=True,
)


async def test_openai_sends_tools_and_history_and_assembles_streamed_calls(
    fake: FakeHTTPServer,
) -> None:
    fake.script(CHAT, sse_reply(OPENAI_TOOL_STREAM))
    backend = make_backend(OpenAISpec(model="m", base_url=fake.url + "/v1", timeout=5.0))
    text, calls, done, carrying = await run(backend, request(
        HISTORY, tools=TOOLS, tool_choice=NamedToolChoice(ToolChoiceFunction("get_weather"))))
    assert text == "" and done.finish_reason == "tool_calls" and done.usage.total_tokens == 29
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_1", "get_weather", {"city": "Oslo"}), ("call_2", "get_time", {})]
    assert carrying >= 1
    body = fake.requests[0].json()
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                          "parameters": WEATHER}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"tz": {"type": "string"}}}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["messages"][2] == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time",
                                                          "arguments": "{}"}}]}
    assert body["messages"][3] == {"role": "tool", "content": "4C", "tool_call_id": "call_a"}


async def test_openai_response_format_and_a_whole_json_answer_with_calls(
    fake: FakeHTTPServer,
) -> None:
    fake.script(CHAT, json_reply({"choices": [{"index": 0, "finish_reason": "tool_calls",
                                               "message": {"content": None, "tool_calls": [
        {"id": "c9", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]}}]}))
    fmt = ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(
        name="out", schema=WEATHER, strict=True))
    backend = make_backend(OpenAISpec(model="m", base_url=fake.url + "/v1", timeout=5.0))
    text, calls, done, _ = await run(backend, request(
        tools=TOOLS, tool_choice="required", response_format=fmt))
    assert text == "" and done.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("c9", "get_time", '{"tz": "UTC"}')]
    body = fake.requests[0].json()
    assert body["tool_choice"] == "required"
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": WEATHER, "strict": True}}


async def test_azure_is_the_same_shape(fake: FakeHTTPServer) -> None:
    path = "/openai/deployments/dep/chat/completions"
    fake.script(path, sse_reply(OPENAI_TOOL_STREAM))
    backend = make_backend(AzureSpec(model="m", endpoint=fake.url, deployment="dep",
                                     api_key_env=KEY_ENV, timeout=5.0))
    _, calls, done, _ = await run(backend, request(tools=TOOLS))
    assert done.finish_reason == "tool_calls" and [c.function.name for c in calls] == [
        "get_weather", "get_time"]
    assert fake.requests[0].json()["tools"][0]["function"]["name"] == "get_weather"


# --- Anthropic ------------------------------------------------------------------------------


def anthropic_stream(blocks: list[tuple[str, dict[str, Any], list[dict[str, Any]]]],
                     stop_reason: str) -> list[bytes]:
    evs: list[tuple[str, dict[str, Any]]] = [("message_start", {
        "type": "message_start", "message": {"usage": {"input_tokens": 10,
                                                       "output_tokens": 1}}})]
    for i, (_, start, deltas) in enumerate(blocks):
        evs.append(("content_block_start", {"type": "content_block_start", "index": i,
                                            "content_block": start}))
        evs += [("content_block_delta", {"type": "content_block_delta", "index": i,
                                         "delta": d}) for d in deltas]
        evs.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    evs += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason},
                               "usage": {"output_tokens": 30}}),
            ("message_stop", {"type": "message_stop"})]
    return sse(*evs, named=True)


def anthropic(url: str) -> Backend:
    return make_backend(AnthropicSpec(model="claude", base_url=url, api_key_env=KEY_ENV,
                                      timeout=5.0))


async def test_anthropic_maps_tools_history_and_streamed_tool_use(fake: FakeHTTPServer) -> None:
    fake.script(MESSAGES, sse_reply(anthropic_stream([
        ("text", {"type": "text", "text": ""}, [{"type": "text_delta", "text": "Let me see."}]),
        ("tool", {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"city": '},
          {"type": "input_json_delta", "partial_json": '"Oslo"}'}]),
        ("tool", {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}, []),
    ], "tool_use")))
    text, calls, done, _ = await run(anthropic(fake.url), request(
        HISTORY, tools=TOOLS, tool_choice="required"))
    assert text == "Let me see." and done.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_1", "get_weather", {"city": "Oslo"}), ("toolu_2", "get_time", {})]
    body = fake.requests[0].json()
    assert body["system"] == "Be brief."
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather now", "input_schema": WEATHER},
        {"name": "get_time", "input_schema": {"type": "object",
                                              "properties": {"tz": {"type": "string"}}}}]
    assert body["tool_choice"] == {"type": "any"}
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Oslo and the time?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_a", "name": "get_weather",
             "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "4C"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "12:00"}]},
    ]


@pytest.mark.parametrize(("choice", "wire"), [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}),
    (NamedToolChoice(ToolChoiceFunction("get_time")), {"type": "tool", "name": "get_time"}),
    (None, None),
])
async def test_anthropic_tool_choice(fake: FakeHTTPServer, choice: Any, wire: Any) -> None:
    fake.script(MESSAGES, sse_reply(anthropic_stream(
        [("text", {"type": "text", "text": ""}, [{"type": "text_delta", "text": "ok"}])],
        "end_turn")))
    text, calls, done, _ = await run(anthropic(fake.url), request(tools=TOOLS,
                                                                  tool_choice=choice))
    assert (text, calls, done.finish_reason) == ("ok", [], "stop")
    assert fake.requests[0].json().get("tool_choice") == wire


async def test_anthropic_response_format_is_a_forced_tool_whose_input_is_the_text(
    fake: FakeHTTPServer,
) -> None:
    fake.script(MESSAGES, sse_reply(anthropic_stream([(
        "tool", {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}},
        [{"type": "input_json_delta", "partial_json": '{"city"'},
         {"type": "input_json_delta", "partial_json": ': "Rome"}'}])], "tool_use")))
    fmt = ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(
        name="weather", schema=WEATHER))
    text, calls, done, _ = await run(anthropic(fake.url), request(response_format=fmt))
    assert calls == [] and done.finish_reason == "stop"
    jsonschema.validate(json.loads(text), WEATHER)
    body = fake.requests[0].json()
    assert body["tool_choice"] == {"type": "tool", "name": "weather"}
    assert body["tools"][0]["input_schema"] == WEATHER


async def test_anthropic_refuses_response_format_with_tools(fake: FakeHTTPServer) -> None:
    with pytest.raises(InvalidRequest, match="response_format with tools"):
        await run(anthropic(fake.url), request(
            tools=TOOLS, response_format=ResponseFormat(type="json_object")))
    assert fake.requests == []  # refused before anything was sent


# --- a real OpenAI-compatible server ---------------------------------------------------------


@pytest.fixture(scope="module")
def lcpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("lcpp-tools")
    with llama_cpp_python_server(gemma_path(), logs, "--chat_format", "gemma") as server:
        yield server


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_llama_cpp_python_server_named_tool_and_json_object(
    lcpp_server: ServerProcess,
) -> None:
    spec = OpenAISpec(model="gemma", base_url=lcpp_server.url + "/v1", timeout=120.0)
    tools = [Tool(FunctionDef("get_weather", "Weather in a city", CITY))]
    _, calls, done, carrying = await run(make_backend(spec), Request(
        id="r", model="gemma", messages=[Message("user", "Weather in Lima?")], tools=tools,
        tool_choice=NamedToolChoice(ToolChoiceFunction("get_weather")),
        sampling=Sampling(max_tokens=40, temperature=0.0)))
    [call] = calls
    assert call.function.name == "get_weather" and done.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), CITY)
    assert carrying >= 1  # the server streamed the call as deltas; we assembled them
    text, calls, done, _ = await run(make_backend(spec), Request(
        id="r", model="gemma", messages=[Message("user", "Give a JSON object about Lima.")],
        response_format=ResponseFormat(type="json_object"),
        # llama.cpp checks the grammar over Gemma's whole 262k vocabulary at every token:
        # a few tokens show the format reached the server, the rest would be minutes of CPU
        sampling=Sampling(max_tokens=12, temperature=0.0)))
    assert calls == []
    if done.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")
