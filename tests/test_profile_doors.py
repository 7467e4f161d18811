"""A profile's tool set, and profiles through the doors that have no ``profile=`` argument:
``tokenhive serve`` takes tokenhive's ``profile`` body field (the openai SDK's ``extra_body``).
``tokenhive sidecar`` takes ``TOKENHIVE_PROFILE`` from its environment. Real broker, a tiny
GGUF worker (it can be forced into a tool call), real serve and sidecar processes."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.support.llmkit_peer import LlmkitPeer, complete_params
from tests.support.procs import start_broker
from tests.support.serve import ServeProcess, wait_until
from tests.support.worker_peers import WorkerProc
from tests.test_gguf_pool import gguf_worker
from tokenhive.broker.profiles import apply_profile
from tokenhive.broker.validate_gateway import gateway_problems
from tokenhive.clients import Client
from tokenhive.clients.sidecar.command import SCRIPT
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.gateway_config import Profile
from tokenhive.schemas.messages import Kind, Message, Request
from tokenhive.schemas.tools import FunctionDef, NamedToolChoice, Tool, ToolChoiceFunction

CITY = {"type": "object", "properties": {"city": {"enum": ["paris", "rome"]}},
        "required": ["city"], "additionalProperties": False}
# The random-weights model lays JSON out with all the whitespace the grammar allows: a short
# call still needs a few hundred tokens (as in test_serve_gguf).
ROOM = 500
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
PROFILES = {
    "caller": {"tools": [WEATHER], "tool_choice": "required"},
    "tight": {"tokens_per_minute": 1},
}


@pytest.mark.timeout(10)
def test_a_profile_offers_its_tools_to_chats_that_bring_none() -> None:
    tool = Tool(FunctionDef("get_weather", None, CITY))
    own = Tool(FunctionDef("mine", None, {}))
    profile = Profile(tools=[tool], tool_choice="required")
    chat = Request(id="r", model="m", messages=[Message(role="user", content="hi")])
    applied = apply_profile(chat, profile)
    assert applied.tools == [tool] and applied.tool_choice == "required"
    kept = apply_profile(Request(id="r", model="m", messages=chat.messages, tools=[own]), profile)
    assert kept.tools == [own] and kept.tool_choice is None  # the request's own set wins
    completion = apply_profile(Request(id="c", model="m", kind=Kind.COMPLETION, prompt="x"),
                               profile)
    assert completion.tools == []  # tools are for chats


@pytest.mark.timeout(10)
def test_a_profile_tool_set_is_checked_with_the_config() -> None:
    twice = BrokerConfig(profiles={"p": Profile(tools=[Tool(FunctionDef("f")),
                                                       Tool(FunctionDef("f"))])})
    assert any("profiles.p.tools" in p and "twice" in p for p in gateway_problems(twice))
    unknown = BrokerConfig(profiles={"p": Profile(
        tools=[Tool(FunctionDef("f"))],
        tool_choice=NamedToolChoice(ToolChoiceFunction("g")))})
    assert any(p.startswith("profiles.p.") for p in gateway_problems(unknown))
    assert gateway_problems(BrokerConfig(profiles={"p": Profile(
        tools=[Tool(FunctionDef("f"))], tool_choice="required")})) == []


@pytest.fixture(scope="module")
def oai(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("profile-doors")
    broker = start_broker(tmp, heartbeat_interval=0.2,
                          config_json=json.dumps({"profiles": PROFILES}))
    worker = gguf_worker(broker.workers, tmp, "g0", path=str(tiny_gguf), slots=2, n_ctx=1024)
    try:
        with Client(broker.clients) as status:
            wait_until(lambda: [w.health for w in status.status().workers] == ["ok"], 90,
                       "the gguf worker healthy")
        with ServeProcess(["--broker", broker.clients, "--port", "0"], tmp) as serve, \
                openai.OpenAI(base_url=serve.url + "/v1", api_key="x", max_retries=0) as client:
            yield client
    finally:
        worker.stop()
        broker.terminate()


@pytest.mark.timeout(120)
def test_serve_applies_the_profile_named_in_the_body(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], max_tokens=ROOM,
        extra_body={"profile": "caller"})
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)
    plain = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], max_tokens=4)
    assert plain.choices[0].message.tool_calls is None  # no profile: no tools


@pytest.mark.timeout(120)
def test_serve_refuses_over_a_profiles_budget_and_an_unknown_profile(oai: openai.OpenAI) -> None:
    oai.completions.create(model="tiny", prompt="a", max_tokens=2, extra_body={"profile": "tight"})
    with pytest.raises(openai.RateLimitError) as over:  # 1 token a minute: spent
        oai.completions.create(model="tiny", prompt="a", max_tokens=2,
                               extra_body={"profile": "tight"})
    assert "profile 'tight'" in str(over.value) and "tokens_per_minute=1" in str(over.value)
    with pytest.raises(openai.BadRequestError) as unknown:
        oai.completions.create(model="tiny", prompt="a", max_tokens=2,
                               extra_body={"profile": "nobody"})
    assert "nobody" in str(unknown.value)


@pytest.mark.timeout(90)
def test_the_sidecar_runs_under_the_profile_its_environment_names(tmp_path: Path) -> None:
    """llmkit's protocol has no profile; its config's Env sets TOKENHIVE_PROFILE, and the
    sidecar's requests then run under it: here over a budget, refused with the code."""
    broker = start_broker(tmp_path, heartbeat_interval=0.2,
                          config_json=json.dumps({"profiles": PROFILES}))
    worker = WorkerProc(["--broker", broker.workers, "--spec-json",
                         '{"backend":"echo","model":"echo"}', "--id", "e0",
                         "--heartbeat-interval", "0.2"], tmp_path / "e0.log")
    peer = LlmkitPeer([sys.executable, str(SCRIPT)], tmp_path / "sidecar.stderr", cwd=tmp_path,
                      env={"TOKENHIVE_BROKER": broker.clients, "TOKENHIVE_PROFILE": "tight"})
    try:
        with Client(broker.clients) as status:
            wait_until(lambda: [w.health for w in status.status().workers] == ["ok"], 60,
                       "the echo worker healthy")
        assert "result" in peer.call("init", {"backend": "ollama", "model": "echo"})
        first = peer.call("complete", complete_params("one two", model="echo"))
        assert first["result"]["content"] == "one two"
        second = peer.call("complete", complete_params("one two", model="echo"))
        assert second["error"]["data"]["tokenhive_code"] == "budget_exceeded", second
    finally:
        peer.stop()
        worker.stop()
        broker.terminate()
