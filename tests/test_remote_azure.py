"""The Azure OpenAI adapter against the fake server (tests/support/fake_http.py): no real
Azure endpoint is reachable from tests, so the fake replays Azure's wire format
(deployment URL, api-version query, api-key header, the prompt-filter first chunk,
retry-after-ms) and the test checks what the adapter sends and reads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_http import FakeHTTPServer, Reply, json_reply, sse, sse_reply
from tokenhive.schemas.config import AzureSpec
from tokenhive.schemas.errors import ModelLoadFailed, RateLimited
from tokenhive.schemas.messages import Health, Kind, Message, Request
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.azure import AzureBackend

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
DEPLOYMENT = "gpt4o-prod"
BASE = f"/openai/deployments/{DEPLOYMENT}"
KEY_FILE_TEXT = "azure-key-from-file\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[FakeHTTPServer]:
    with FakeHTTPServer() as server:
        yield server


async def started(url: str, key_file: str, **kw: object) -> AzureBackend:
    spec = AzureSpec(model="gpt4o", endpoint=url + "/", deployment=DEPLOYMENT,
                     api_key_env=None, api_key_file=key_file, timeout=5.0,
                     **kw)  # type: ignore[arg-type]
    backend = make_backend(spec)
    assert isinstance(backend, AzureBackend)
    await backend.start()
    return backend


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "azure.key"
    path.write_text(KEY_FILE_TEXT)
    return str(path)


async def test_chat_url_query_key_and_filter_chunk(fake: FakeHTTPServer, key_file: str) -> None:
    fake.script(f"{BASE}/chat/completions", sse_reply(sse(
        {"choices": [], "prompt_filter_results": [{"prompt_index": 0,
                                                   "content_filter_results": {}}]},
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi!"}, "finish_reason": None,
                      "content_filter_results": {}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                  "total_tokens": 11}},
        done=True)))
    backend = await started(fake.url, key_file, api_version="2024-10-21")
    try:
        items = [i async for i in backend.stream(
            Request(id="z", model="gpt4o", messages=[Message("user", "hello")]))]
        assert backend.info().backend == "azure"
    finally:
        await backend.close()
    assert [i.text for i in items if isinstance(i, Delta)] == ["Hi!"]
    done = items[-1]
    assert isinstance(done, Done) and done.usage.total_tokens == 11 and not done.usage.estimated
    req = fake.requests[0]
    assert req.path == f"{BASE}/chat/completions"
    assert req.query == {"api-version": ["2024-10-21"]}
    assert req.headers["api-key"] == "azure-key-from-file"
    assert "authorization" not in req.headers
    body = req.json()
    assert "model" not in body and body["stream_options"] == {"include_usage": True}


async def test_embeddings(fake: FakeHTTPServer, key_file: str) -> None:
    fake.script(f"{BASE}/embeddings", json_reply({
        "data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4}}))
    backend = await started(fake.url, key_file)
    try:
        result = await backend.embed(
            Request(id="e", model="gpt4o", kind=Kind.EMBEDDING, input=["a", "b"]))
    finally:
        await backend.close()
    assert result.vectors == [[1.0, 0.0], [0.0, 1.0]]  # ordered by index
    assert result.usage.prompt_tokens == 4 and not result.usage.estimated
    assert fake.requests[0].json() == {"input": ["a", "b"], "encoding_format": "float"}


async def test_429_retry_after_ms(fake: FakeHTTPServer, key_file: str) -> None:
    fake.script(f"{BASE}/chat/completions", Reply(
        429, [b'{"error":{"code":"429","message":"Requests to the ChatCompletions_Create '
              b'Operation have exceeded call rate limit"}}'],
        {"retry-after-ms": "1500", "retry-after": "2", "content-type": "application/json"}))
    backend = await started(fake.url, key_file)
    try:
        with pytest.raises(RateLimited, match="exceeded call rate limit") as info:
            async for _ in backend.stream(
                    Request(id="z", model="gpt4o", messages=[Message("user", "x")])):
                pass
        assert info.value.retry_after == 1.5
        report = backend.health()
        assert report.health == Health.DEGRADED and 0 < (report.retry_after or 0) <= 1.5
    finally:
        await backend.close()


async def test_key_is_required(fake: FakeHTTPServer, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match="cannot read api key file"):
        await started(fake.url, str(tmp_path / "missing.key"))
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ModelLoadFailed, match="is empty"):
        await started(fake.url, str(empty))


async def test_stream_options_rejected_then_dropped(fake: FakeHTTPServer, key_file: str) -> None:
    # What Azure answers on api-versions that predate stream_options.
    rejection = Reply(400, [b'{"error":{"code":null,"message":"Unrecognized request argument '
                            b'supplied: stream_options","param":null,"type":"invalid_request_error"'
                            b'}}'], {"content-type": "application/json"})
    ok = sse_reply(sse({"choices": [{"index": 0, "delta": {"content": "fine"},
                                     "finish_reason": "stop"}]}, done=True))
    fake.script(f"{BASE}/chat/completions", rejection, ok)
    backend = await started(fake.url, key_file, api_version="2024-02-01")
    request = Request(id="z", model="gpt4o", messages=[Message("user", "x")])
    try:
        first = [i async for i in backend.stream(request)]
        second = [i async for i in backend.stream(request)]
    finally:
        await backend.close()
    for items in (first, second):
        assert isinstance(items[0], Delta) and items[0].text == "fine"
        assert isinstance(items[-1], Done) and items[-1].usage.estimated
    bodies = [r.json() for r in fake.requests]
    assert "stream_options" in bodies[0]
    assert all("stream_options" not in b for b in bodies[1:]) and len(bodies) == 3
