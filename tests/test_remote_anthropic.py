"""The Anthropic Messages adapter against the fake server (tests/support/fake_http.py): no
real Anthropic endpoint is reachable from tests, so the fake replays the documented wire
format (event names, payload shapes) and the test checks what the adapter sends and how it
reads the events."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_http import FakeHTTPServer, Reply, sse, sse_reply
from tokenhive.schemas.config import AnthropicSpec
from tokenhive.schemas.errors import (
    BackendError,
    ContextTooLong,
    InvalidRequest,
    ModelLoadFailed,
    RateLimited,
)
from tokenhive.schemas.messages import Health, Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.anthropic import AnthropicBackend

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
PATH = "/v1/messages"
KEY_ENV = "TH_TEST_ANTHROPIC_KEY"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHTTPServer]:
    monkeypatch.setenv(KEY_ENV, "sk-ant-test-key")
    with FakeHTTPServer() as server:
        yield server


def events(*, stop_reason: str = "end_turn", texts: tuple[str, ...] = ("Hello", " there"),
           stop: bool = True) -> list[bytes]:
    """A stream shaped like the Messages API documentation's example."""
    evs: list[tuple[str, dict]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-x", "stop_reason": None,
            "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    evs += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": t}}) for t in texts]
    evs += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                           "usage": {"output_tokens": 15}}),
    ]
    if stop:
        evs.append(("message_stop", {"type": "message_stop"}))
    return sse(*evs, named=True)


async def started(url: str, **kw: object) -> AnthropicBackend:
    spec = AnthropicSpec(model="claude", base_url=url, api_key_env=KEY_ENV, slots=8,
                         timeout=5.0, **kw)  # type: ignore[arg-type]
    backend = make_backend(spec)
    assert isinstance(backend, AnthropicBackend)
    await backend.start()
    return backend


async def run(backend: AnthropicBackend, request: Request) -> tuple[list[Delta], Done]:
    items = [item async for item in backend.stream(request)]
    assert items and isinstance(items[-1], Done)
    assert all(isinstance(i, Delta) for i in items[:-1])
    return items[:-1], items[-1]  # type: ignore[return-value]


REQUEST = Request(id="a1", model="claude", messages=[
    Message("system", "You are terse."), Message("user", "Hi"), Message("assistant", "Yo"),
    Message("user", "Again")], sampling=Sampling(temperature=0.2, stop=["END"]))


async def test_headers_body_text_usage(fake: FakeHTTPServer) -> None:
    fake.script(PATH, sse_reply(events()))
    backend = await started(fake.url, upstream_model="claude-3-haiku", headers={"x-extra": "1"})
    try:
        deltas, done = await run(backend, REQUEST)
        assert backend.info().kinds == [Kind.CHAT] and backend.info().backend == "anthropic"
    finally:
        await backend.close()
    assert "".join(d.text for d in deltas) == "Hello there"
    assert done.finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens,
            done.usage.estimated) == (30, 15, 45, False)
    req = fake.requests[0]
    assert req.path == PATH
    assert req.headers["x-api-key"] == "sk-ant-test-key"
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["x-extra"] == "1" and "authorization" not in req.headers
    body = req.json()
    assert body == {
        "model": "claude-3-haiku", "max_tokens": 1024, "stream": True,
        "system": "You are terse.", "temperature": 0.2, "stop_sequences": ["END"],
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                     {"role": "user", "content": "Again"}],
    }


@pytest.mark.parametrize(("reason", "expected"),
                         [("end_turn", "stop"), ("stop_sequence", "stop"),
                          ("max_tokens", "length")])
async def test_stop_reason_mapping(fake: FakeHTTPServer, reason: str, expected: str) -> None:
    fake.script(PATH, sse_reply(events(stop_reason=reason)))
    backend = await started(fake.url, anthropic_version="2024-01-01", default_max_tokens=33)
    try:
        _, done = await run(backend, REQUEST)
    finally:
        await backend.close()
    assert done.finish_reason == expected
    assert fake.requests[0].headers["anthropic-version"] == "2024-01-01"
    assert fake.requests[0].json()["max_tokens"] == 33


async def test_error_event_mid_stream(fake: FakeHTTPServer) -> None:
    parts = events(stop=False)[:4] + sse(("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}}), named=True)
    fake.script(PATH, sse_reply(parts))
    backend = await started(fake.url)
    try:
        with pytest.raises(BackendError, match="Overloaded") as info:
            await run(backend, REQUEST)
    finally:
        await backend.close()
    assert info.value.retryable


async def test_rate_limit_error_event_degrades_health(fake: FakeHTTPServer) -> None:
    fake.script(PATH, sse_reply(sse(("error", {"type": "error", "error": {
        "type": "rate_limit_error", "message": "Number of requests exceeded"}}), named=True)))
    backend = await started(fake.url)
    try:
        with pytest.raises(RateLimited):
            await run(backend, REQUEST)
        assert backend.health().health == Health.DEGRADED
    finally:
        await backend.close()


async def test_http_errors(fake: FakeHTTPServer) -> None:
    fake.script(
        PATH,
        Reply(429, [b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}'],
              {"retry-after": "12"}),
        Reply(400, [b'{"type":"error","error":{"type":"invalid_request_error","message":'
                    b'"prompt is too long: 210000 tokens > 200000 maximum"}}']),
        Reply(400, [b'{"type":"error","error":{"type":"invalid_request_error","message":'
                    b'"max_tokens: Field required"}}']),
        Reply(529, [b'{"type":"error","error":{"type":"overloaded_error","message":'
                    b'"Overloaded"}}']),
    )
    backend = await started(fake.url)
    try:
        with pytest.raises(RateLimited) as limited:
            await run(backend, REQUEST)
        assert limited.value.retry_after == 12.0
        assert backend.health().retry_after is not None
        with pytest.raises(ContextTooLong, match="prompt is too long"):
            await run(backend, REQUEST)
        with pytest.raises(InvalidRequest, match="max_tokens: Field required"):
            await run(backend, REQUEST)
        with pytest.raises(BackendError, match="HTTP 529: Overloaded"):
            await run(backend, REQUEST)
    finally:
        await backend.close()


async def test_stream_without_message_stop_is_an_error(fake: FakeHTTPServer) -> None:
    fake.script(PATH, sse_reply(events(stop=False)))
    backend = await started(fake.url)
    try:
        with pytest.raises(BackendError, match="before message_stop"):
            await run(backend, REQUEST)
    finally:
        await backend.close()


async def test_missing_usage_is_estimated(fake: FakeHTTPServer) -> None:
    parts = sse(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "abcdefgh"}}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
                ("message_stop", {"type": "message_stop"}), named=True)
    fake.script(PATH, sse_reply(parts))
    backend = await started(fake.url)
    try:
        deltas, done = await run(backend, REQUEST)
    finally:
        await backend.close()
    assert deltas[0].tokens == 2
    assert done.usage.estimated and done.usage.completion_tokens == 2


async def test_completion_requests_and_missing_key_are_refused(
    fake: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await started(fake.url)
    try:
        with pytest.raises(InvalidRequest, match="does not serve completion"):
            await run(backend, Request(id="c", model="claude", kind=Kind.COMPLETION, prompt="x"))
    finally:
        await backend.close()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ModelLoadFailed, match=KEY_ENV):
        await started(fake.url)
    assert fake.requests == []
