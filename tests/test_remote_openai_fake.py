"""The OpenAI adapter against tests/support/fake_http.py: the error paths and wire details a
real server will not produce on demand (429 + Retry-After, 500 bodies, cut streams, malformed
SSE, a hanging server, a client hang-up). The normal paths run against real servers in
test_remote_llamacpp.py / test_remote_llama_server.py."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator

import anyio
import pytest

from tests.support.fake_http import FakeHTTPServer, Reply, json_reply, sse, sse_reply
from tests.support.real_servers import free_port
from tokenhive.schemas.config import OpenAISpec
from tokenhive.schemas.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextTooLong,
    InvalidRequest,
    ModelLoadFailed,
    RateLimited,
    TokenHiveError,
)
from tokenhive.schemas.messages import Health, Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.openai import OpenAIBackend

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
CHAT = "/v1/chat/completions"


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


@pytest.fixture
def fake() -> Iterator[FakeHTTPServer]:
    with FakeHTTPServer() as server:
        yield server


def spec(url: str, **kw: object) -> OpenAISpec:
    kw.setdefault("timeout", 5.0)
    return OpenAISpec(model="m", base_url=url + "/v1", slots=4, **kw)  # type: ignore[arg-type]


def chat(text: str = "hi", **sampling: object) -> Request:
    return Request(id="r1", model="m", messages=[Message("user", text)],
                   sampling=Sampling(**sampling))  # type: ignore[arg-type]


def chunk(text: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choice = {"index": 0, "delta": {} if text is None else {"content": text},
              "finish_reason": finish}
    out: dict = {"choices": [choice]}
    if usage is not None:
        out = {"choices": [], "usage": usage}
    return out


async def collect(backend: OpenAIBackend, request: Request) -> tuple[list[Delta], Done]:
    deltas: list[Delta] = []
    done: list[Done] = []
    async for item in backend.stream(request):
        assert not done, "nothing may follow Done"
        (deltas if isinstance(item, Delta) else done).append(item)  # type: ignore[arg-type]
    assert len(done) == 1
    return deltas, done[0]


async def started(s: OpenAISpec) -> OpenAIBackend:
    backend = make_backend(s)
    assert isinstance(backend, OpenAIBackend)
    await backend.start()
    return backend


# -- normal stream, wire format ------------------------------------------------------------------


async def test_stream_text_usage_headers_and_body(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, sse_reply(sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        chunk("Hel"), chunk("lo\u2028!"), chunk(finish="stop"),
        chunk(usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
        b": keep-alive comment\n\n", done=True)))
    backend = await started(spec(fake.url, upstream_model="gpt-x", headers={"x-team": "a"},
                                 sampling_extras="llama.cpp"))
    try:
        deltas, done = await collect(backend, chat(max_tokens=5, top_k=3, seed=1))
    finally:
        await backend.close()
    assert "".join(d.text for d in deltas) == "Hello\u2028!"
    assert done.finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens,
            done.usage.estimated) == (5, 2, 7, False)
    req = fake.requests[0]
    assert req.path == CHAT and req.headers["accept"] == "text/event-stream"
    assert req.headers["x-team"] == "a" and "authorization" not in req.headers
    body = req.json()
    assert body["model"] == "gpt-x" and body["stream"] is True and body["top_k"] == 3
    assert body["stream_options"] == {"include_usage": True} and body["seed"] == 1


async def test_no_usage_in_stream_is_estimated_and_length_maps(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, sse_reply(sse(chunk("a"), chunk("b"), chunk("c", "length"), done=True)))
    backend = await started(spec(fake.url, include_usage=False))
    try:
        deltas, done = await collect(backend, chat("x" * 40))
    finally:
        await backend.close()
    assert "".join(d.text for d in deltas) == "abc" and sum(d.tokens for d in deltas) == 3
    assert done.finish_reason == "length"
    assert done.usage.estimated and done.usage.completion_tokens == 3
    assert done.usage.prompt_tokens > 0
    assert "stream_options" not in fake.requests[0].json()


async def test_text_that_arrives_together_is_one_delta(fake: FakeHTTPServer) -> None:
    one_write = b"".join(sse(*(chunk(f"t{i} ") for i in range(16)), chunk(finish="stop"),
                             done=True))
    fake.script(CHAT, sse_reply([one_write]))
    backend = await started(spec(fake.url))
    try:
        deltas, _ = await collect(backend, chat())
    finally:
        await backend.close()
    assert [(d.text, d.tokens) for d in deltas] == [("".join(f"t{i} " for i in range(16)), 16)]


async def test_text_is_not_held_back_waiting_for_more(fake: FakeHTTPServer) -> None:
    # The server sends one token and then goes quiet: that token must arrive right away.
    fake.script(CHAT, sse_reply(sse(chunk("first")), hang=True))
    backend = await started(spec(fake.url))
    try:
        gen = backend.stream(chat())
        assert isinstance(gen, AsyncGenerator)
        with anyio.fail_after(3):
            first = await gen.__anext__()
        assert isinstance(first, Delta) and first.text == "first"
        await gen.aclose()
    finally:
        await backend.close()


async def test_completion_endpoint_and_json_body_instead_of_stream(fake: FakeHTTPServer) -> None:
    # A server that ignores "stream": true and answers with one JSON body is still served.
    fake.script("/v1/completions", json_reply({
        "choices": [{"index": 0, "text": " upon a time", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}}))
    backend = await started(spec(fake.url))
    try:
        deltas, done = await collect(
            backend, Request(id="c", model="m", kind=Kind.COMPLETION, prompt="Once"))
    finally:
        await backend.close()
    assert [d.text for d in deltas] == [" upon a time"] and deltas[0].tokens == 4
    assert done.finish_reason == "length" and done.usage.total_tokens == 6
    assert fake.requests[0].json()["prompt"] == "Once"


async def test_bearer_key_from_env(fake: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TH_TEST_OPENAI_KEY", "sk-test-123")
    fake.script(CHAT, sse_reply(sse(chunk("x", "stop"), done=True)))
    backend = await started(spec(fake.url, api_key_env="TH_TEST_OPENAI_KEY"))
    try:
        await collect(backend, chat())
    finally:
        await backend.close()
    assert fake.requests[0].headers["authorization"] == "Bearer sk-test-123"


async def test_kinds_are_enforced(fake: FakeHTTPServer) -> None:
    backend = await started(spec(fake.url, kinds=["embedding"]))
    try:
        assert backend.info().kinds == [Kind.EMBEDDING] and backend.info().device == "remote"
        with pytest.raises(InvalidRequest, match="does not serve chat"):
            await collect(backend, chat())
    finally:
        await backend.close()
    assert fake.requests == []


# -- error paths ---------------------------------------------------------------------------------


async def test_429_retry_after_degrades_health_until_it_passes(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, Reply(429, [b'{"error":{"message":"Rate limit reached"}}'],
                            {"retry-after": "0.4", "content-type": "application/json"}),
                sse_reply(sse(chunk("ok", "stop"), done=True)))
    backend = await started(spec(fake.url))
    try:
        assert backend.health().health == Health.OK
        with pytest.raises(RateLimited) as info:
            await collect(backend, chat())
        assert info.value.retry_after == pytest.approx(0.4) and info.value.retryable
        assert "Rate limit reached" in info.value.message
        report = backend.health()
        assert report.health == Health.DEGRADED and 0 < (report.retry_after or 0) <= 0.4
        deadline = time.monotonic() + 5
        while backend.health().health != Health.OK:
            assert time.monotonic() < deadline, "health stayed degraded past retry-after"
            await anyio.sleep(0.02)  # polling interval of a deadline-bounded wait
        deltas, _ = await collect(backend, chat())
        assert deltas[0].text == "ok"
    finally:
        await backend.close()


async def test_429_with_http_date(fake: FakeHTTPServer) -> None:
    import email.utils

    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    fake.script(CHAT, Reply(429, [b"busy"], {"retry-after": when}))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(RateLimited) as info:
            await collect(backend, chat())
        assert 100 < (info.value.retry_after or 0) <= 120
        assert backend.health().health == Health.DEGRADED
    finally:
        await backend.close()


async def test_500_body_is_quoted_bounded(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, Reply(500, [b"Internal failure: CUDA error 700 " + b"x" * 10_000]))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(BackendError) as info:
            await collect(backend, chat())
    finally:
        await backend.close()
    assert type(info.value) is BackendError and info.value.retryable
    assert "HTTP 500" in info.value.message and "CUDA error 700" in info.value.message
    assert len(info.value.message) < 2300


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [(400, b'{"error":{"message":"maximum context length is 2048 tokens"}}', ContextTooLong),
     (413, b"request entity too large", ContextTooLong),
     (422, b'{"detail":[{"msg":"field required"}]}', InvalidRequest)],
)
async def test_4xx(
    fake: FakeHTTPServer, status: int, body: bytes, error: type[TokenHiveError]
) -> None:
    fake.script(CHAT, Reply(status, [body]))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(error) as info:
            await collect(backend, chat())
    finally:
        await backend.close()
    assert not info.value.retryable
    assert backend.health().health == Health.OK  # a bad request says nothing about upstream


async def test_stream_cut_mid_way_chunked(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, sse_reply(sse(chunk("partial")), chunked=True, cut=True))
    backend = await started(spec(fake.url))
    seen: list[str] = []
    try:
        with pytest.raises(BackendError, match="mid-response"):
            async for item in backend.stream(chat()):
                assert isinstance(item, Delta)
                seen.append(item.text)
    finally:
        await backend.close()
    assert seen == ["partial"]


async def test_stream_closed_before_done(fake: FakeHTTPServer) -> None:
    # Without chunked encoding an early close looks like a normal end to HTTP: only the
    # missing [DONE] / finish_reason tells.
    fake.script(CHAT, sse_reply(sse(chunk("partial"))))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(BackendError, match=r"ended before \[DONE\]"):
            await collect(backend, chat())
    finally:
        await backend.close()


@pytest.mark.parametrize("bad", [b"data: {not json\n\n", b'data: {"choices": "nope"}\n\n'])
async def test_malformed_sse_data(fake: FakeHTTPServer, bad: bytes) -> None:
    fake.script(CHAT, sse_reply(sse(chunk("ok"), bad, done=True)))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(BackendError, match="malformed upstream response") as info:
            await collect(backend, chat())
    finally:
        await backend.close()
    assert info.value.retryable


async def test_html_instead_of_an_event_stream(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, Reply(200, [b"<html><body>Please log in</body></html>"],
                            {"content-type": "text/html"}))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(BackendError, match="expected an event stream, got text/html"):
            await collect(backend, chat())
    finally:
        await backend.close()


async def test_error_object_inside_stream(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, sse_reply(sse(chunk("a"), {"error": {"message": "model crashed",
                                                           "type": "server_error"}})))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(BackendError, match="model crashed"):
            await collect(backend, chat())
    finally:
        await backend.close()


async def test_llama_cpp_error_line_inside_stream(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, sse_reply([b'error: {"code":400,"message":"the request exceeds the '
                                 b'available context size","type":"exceed_context_size_error"}'
                                 b"\n\n"]))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(ContextTooLong, match="context size"):
            await collect(backend, chat())
    finally:
        await backend.close()


async def test_hanging_server_times_out(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, sse_reply(sse(chunk("first")), hang=True))
    backend = await started(spec(fake.url, timeout=0.5))
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendTimeout):
            await collect(backend, chat())
        assert time.monotonic() - t0 < 5
    finally:
        await backend.close()


async def test_unreachable_server_is_unavailable_and_degrades_health() -> None:
    backend = await started(spec(f"http://127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(BackendUnavailable, match="cannot connect"):
            await collect(backend, chat())
        report = backend.health()
        assert report.health == Health.DEGRADED and report.detail == "upstream unreachable"
        assert report.retry_after is not None
    finally:
        await backend.close()


async def test_only_a_reused_connection_closed_before_answering_is_resent(
    fake: FakeHTTPServer,
) -> None:
    # A fresh connection that closes without an answer may have reached an upstream that is
    # already generating (and billing): it is never re-sent.
    fake.script(CHAT, Reply(drop=True))
    backend = await started(spec(fake.url))
    try:
        with pytest.raises(BackendUnavailable, match="closed the connection"):
            await collect(backend, chat())
        assert len(fake.requests) == 1
        # A keep-alive connection that served a request and then closed as we reused it:
        # nothing was answered, so sending again on a fresh connection does nothing twice.
        fake.script(CHAT, sse_reply(sse(chunk("one", "stop"), done=True), chunked=True),
                    Reply(drop=True),
                    sse_reply(sse(chunk("two", "stop"), done=True)))
        deltas, _ = await collect(backend, chat())
        assert deltas[0].text == "one"
        deltas, _ = await collect(backend, chat())
        assert deltas[0].text == "two" and len(fake.requests) == 4
    finally:
        await backend.close()


async def test_cancel_closes_the_upstream_stream(fake: FakeHTTPServer) -> None:
    # The fake keeps writing until the client hangs up, and records when it does.
    fake.script(CHAT, sse_reply(sse(chunk("first")), drip=True))
    backend = await started(spec(fake.url))
    try:
        gen = backend.stream(chat())
        assert isinstance(gen, AsyncGenerator)
        first = await gen.__anext__()
        assert isinstance(first, Delta) and first.text == "first"
        await gen.aclose()  # what the runtime's task cancellation amounts to
        assert await anyio.to_thread.run_sync(fake.client_gone.wait, 5.0)
    finally:
        await backend.close()


async def test_task_cancellation_closes_the_upstream_stream(fake: FakeHTTPServer) -> None:
    fake.script(CHAT, sse_reply(sse(chunk("first")), drip=True))
    backend = await started(spec(fake.url))
    got_first = anyio.Event()

    async def consume() -> None:
        async for _ in backend.stream(chat()):
            got_first.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await got_first.wait()
            tg.cancel_scope.cancel()
        assert await anyio.to_thread.run_sync(fake.client_gone.wait, 5.0)
    finally:
        await backend.close()


async def test_start_rejects_bad_url_and_missing_key() -> None:
    with pytest.raises(ModelLoadFailed, match="not an http"):
        await started(spec("ftp://example"))
    with pytest.raises(ModelLoadFailed, match="TH_TEST_UNSET_VAR"):
        await started(spec("http://127.0.0.1:1", api_key_env="TH_TEST_UNSET_VAR"))
