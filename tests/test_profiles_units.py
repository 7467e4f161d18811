"""Applying a profile to a request as plain code: the request's own fields win, the profile
fills the rest; and the client's side (profile= and for_agent) builds the right requests."""

from __future__ import annotations

import asyncio

import pytest

from tokenhive.broker.profiles import apply_profile
from tokenhive.clients import AsyncClient
from tokenhive.clients.request_builder import build_request
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.gateway_config import Profile
from tokenhive.schemas.messages import Kind, Message, Priority, Request, Sampling

PROFILE = Profile(model="chat", system="Be brief.", priority=Priority.INTERACTIVE,
                  sampling=Sampling(temperature=0.1, max_tokens=32, stop=["\n\n"]))


@pytest.mark.timeout(10)
def test_profile_fills_only_what_the_request_left_unset() -> None:
    bare = Request(id="r", model="", messages=[Message(role="user", content="hi")])
    applied = apply_profile(bare, PROFILE)
    assert applied.model == "chat" and applied.priority == Priority.INTERACTIVE
    assert applied.sampling == Sampling(temperature=0.1, max_tokens=32, stop=["\n\n"])
    assert [(m.role, m.content) for m in applied.messages] == [("system", "Be brief."),
                                                                ("user", "hi")]
    own = Request(id="r", model="big", priority=Priority.BATCH,
                  messages=[Message(role="system", content="Mine."),
                            Message(role="user", content="hi")],
                  sampling=Sampling(temperature=1.0, stop=["END"]))
    kept = apply_profile(own, PROFILE)
    assert kept.model == "big" and kept.priority == Priority.BATCH
    assert kept.sampling.temperature == 1.0 and kept.sampling.stop == ["END"]
    assert kept.sampling.max_tokens == 32
    assert [m.content for m in kept.messages] == ["Mine.", "hi"]
    completion = apply_profile(Request(id="c", model="m", kind=Kind.COMPLETION, prompt="x"),
                               PROFILE)
    assert completion.messages == [] and completion.prompt == "x"  # no system for completions
    assert apply_profile(bare, Profile()) is bare  # nothing to fill: the same request


@pytest.mark.timeout(10)
def test_client_side_profile_and_model() -> None:
    with pytest.raises(InvalidRequest, match="no model given"):
        build_request(Kind.CHAT, None, {}, messages=[Message(role="user", content="x")])
    built = build_request(Kind.CHAT, None, {}, messages=[Message(role="user", content="x")],
                          default_profile="planner")
    assert built.model == "" and built.profile == "planner"
    override = build_request(Kind.CHAT, "m", {"profile": "coder"},
                             messages=[Message(role="user", content="x")],
                             default_profile="planner")
    assert override.model == "m" and override.profile == "coder"


@pytest.mark.timeout(10)
def test_for_agent_is_a_view_on_the_same_connection() -> None:
    async def main() -> None:
        client = AsyncClient("tcp://127.0.0.1:1", model="m")
        planner = client.for_agent("planner")
        assert planner.profile == "planner" and client.profile is None
        assert planner._conn is client._conn and planner.model == "m"
        assert planner._with_defaults(Request(id="r", model="m")).profile == "planner"
        assert client._with_defaults(Request(id="r", model="m")).profile is None
        await planner.aclose()  # a view: the connection stays open for the client
        assert not client._conn._closed
        await client.aclose()
        assert client._conn._closed

    asyncio.run(main())
