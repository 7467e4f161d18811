"""The pieces of ``tokenhive serve`` that need no process: the error table, body parsing,
SSE framing, the retry rule, metric label caps."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from tokenhive.clients.http.auth import key_matches
from tokenhive.clients.http.context import ServeRetry
from tokenhive.clients.http.errors import STATUS_OF, BadField, from_exception
from tokenhive.clients.http.metrics import MAX_MODEL_LABELS, OTHER_MODEL, ServeMetrics
from tokenhive.clients.http.openai_requests import parse_body
from tokenhive.clients.http.openai_responses import SseFramer
from tokenhive.schemas.errors import (
    ContextTooLong,
    ErrorCode,
    Overloaded,
    RateLimited,
    WorkerLost,
    error_class,
)
from tokenhive.schemas.messages import Kind, Usage

pytestmark = pytest.mark.timeout(10)


def test_every_error_code_has_an_http_status() -> None:
    assert set(STATUS_OF) == set(ErrorCode)
    for code, row in STATUS_OF.items():
        response = from_exception(error_class(code)("boom"))
        assert response.status_code == row.status
        body = json.loads(bytes(response.body))
        assert body == {"error": {"message": "boom", "type": row.type, "code": row.code,
                                  "param": None}}
        if row.status in (429, 503):
            assert response.headers["retry-after"] == "1"


def test_statuses_users_expect() -> None:
    expect = {ErrorCode.UNKNOWN_MODEL: 404, ErrorCode.INVALID_REQUEST: 400,
              ErrorCode.CONTEXT_TOO_LONG: 400, ErrorCode.RATE_LIMITED: 429,
              ErrorCode.OVERLOADED: 503, ErrorCode.BROKER_UNAVAILABLE: 503,
              ErrorCode.DEADLINE_EXCEEDED: 504}
    assert {code: STATUS_OF[code].status for code in expect} == expect
    assert STATUS_OF[ErrorCode.CONTEXT_TOO_LONG].code == "context_length_exceeded"
    assert STATUS_OF[ErrorCode.UNKNOWN_MODEL].code == "model_not_found"
    slow_down = from_exception(RateLimited("slow down", retry_after=2.2))
    assert slow_down.status_code == 429 and slow_down.headers["retry-after"] == "3"


def test_parse_accepts_no_op_and_harmless_fields_and_decoded_objects() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "n": 1, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "logprobs": False, "user": "u", "metadata": {"k": "v"}, "store": False,
        "max_tokens": 9, "max_completion_tokens": 4, "stop": "x"}
    from_bytes = parse_body(Kind.CHAT, msgspec.json.encode(body))
    from_dict = parse_body(Kind.CHAT, body)  # a Batch API line's body, already decoded
    for parsed in (from_bytes, from_dict):
        assert parsed.request.messages[0].content == "ab"
        assert parsed.request.sampling.max_tokens == 4 and parsed.request.sampling.stop == ["x"]
        assert parsed.request.metadata == {}  # client metadata never reaches workers
        assert not parsed.stream


def test_bad_fields_name_their_path() -> None:
    with pytest.raises(BadField) as info:
        parse_body(Kind.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                               "stream_options": {"include_usage": "yes"}, "stream": True})
    assert info.value.param == "stream_options.include_usage"
    with pytest.raises(BadField) as info:
        parse_body(Kind.COMPLETION, {"model": "m", "prompt": "x", "top_p": 0})
    assert (info.value.param, info.value.http_code) == ("top_p", "invalid_value")
    with pytest.raises(BadField) as info:
        parse_body(Kind.EMBEDDING, {"model": "", "input": "x"})
    assert info.value.param == "model"


def test_sse_frames_are_one_json_event_each() -> None:
    framer = SseFramer(Kind.CHAT, "abc", "m", include_usage=True, created=5)
    tricky = 'quote " newline \n unicode é \u2028 end'
    events = [framer.start(), framer.delta(tricky), framer.finish("length", Usage(1, 2, 3))]
    raw = b"".join(events).decode()
    assert raw.endswith("data: [DONE]\n\n")
    parsed = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n")[:-2]]
    assert [p["choices"][0]["delta"] if p["choices"] else None for p in parsed] == [
        {"role": "assistant", "content": ""}, {"content": tricky}, {}, None]
    assert {p["id"] for p in parsed} == {"chatcmpl-abc"}
    assert parsed[-1]["usage"]["total_tokens"] == 3
    plain = SseFramer(Kind.COMPLETION, "abc", "m")
    assert plain.start() == b""
    assert json.loads(plain.delta("t").decode().removeprefix("data: ")) == {
        "id": "cmpl-abc", "object": "text_completion", "created": plain._head["created"],
        "model": "m", "choices": [{"index": 0, "text": "t", "logprobs": None,
                                   "finish_reason": None}]}


def test_load_refusals_go_back_to_the_caller_other_failures_are_retried() -> None:
    policy = ServeRetry(max_attempts=3)
    assert not policy.should_retry(Overloaded("full"), 1, 0)
    assert not policy.should_retry(RateLimited("slow"), 1, 0)
    assert policy.should_retry(WorkerLost("gone"), 1, 0)
    assert not policy.should_retry(WorkerLost("gone"), 1, 1)  # something streamed already
    assert not policy.should_retry(ContextTooLong("long"), 1, 0)


def test_model_labels_are_capped() -> None:
    metrics = ServeMetrics()
    labels = {metrics.model_label(f"m{i}") for i in range(MAX_MODEL_LABELS + 10)}
    assert len(labels) == MAX_MODEL_LABELS + 1 and OTHER_MODEL in labels
    assert metrics.model_label("m0") == "m0"


def test_key_comparison() -> None:
    keys = [b"sk-one", b"sk-two"]
    assert key_matches(b"sk-two", keys) and not key_matches(b"sk-tw", keys)
    assert not key_matches(b"", keys) and not key_matches(b"sk-one", [])


def test_build_app_runs_hooks_in_order_and_mounts_extra_routes() -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from tokenhive.clients.async_client import AsyncClient
    from tokenhive.clients.http.app import build_app
    from tokenhive.clients.http.context import ServeContext

    seen: list[str] = []

    def hook(name: str, fail: bool = False) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            seen.append(name)
            if fail:
                raise RuntimeError(name)
        return run

    async def extra(request: object) -> PlainTextResponse:
        return PlainTextResponse("extra")

    app = build_app(ServeContext(client=AsyncClient("ipc:///nowhere")),  # never contacted
                    extra_routes=[Route("/v1/extra", extra)],
                    on_startup=[hook("start-a"), hook("start-b")],
                    on_shutdown=[hook("stop-a"), hook("stop-b", fail=True)])
    with TestClient(app) as http:
        assert seen == ["start-a", "start-b"]
        assert http.get("/v1/extra").text == "extra"
        assert http.get("/v1/nothing").json()["error"]["code"] == "unknown_url"
    assert seen[2:] == ["stop-b", "stop-a"]  # reverse order; a failing hook skips no other
