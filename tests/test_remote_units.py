"""Pure parts of the remote backends: SSE splitting/parsing, the HTTP error translator,
Retry-After parsing and the request bodies. The network paths are in the other
test_remote_* files."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenhive.schemas.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextTooLong,
    InvalidRequest,
    RateLimited,
    TokenHiveError,
)
from tokenhive.schemas.messages import Kind, Message, Request, Sampling
from tokenhive.workers.backends.anthropic import messages_body, split_system
from tokenhive.workers.backends.http import errors as http_errors
from tokenhive.workers.backends.http.openai_wire import request_body
from tokenhive.workers.backends.http.sse import MalformedStream, SSEEvent, SSEParser, iter_lines

pytestmark = pytest.mark.timeout(30)


def parse_all(lines: list[str]) -> list[SSEEvent]:
    parser = SSEParser()
    out = [ev for line in lines if (ev := parser.feed(line)) is not None]
    if (last := parser.flush()) is not None:
        out.append(last)
    return out


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def split_lines(parts: list[bytes], max_line: int = 1 << 20) -> list[str]:
    import asyncio

    async def collect() -> list[str]:
        return [line async for line in iter_lines(_chunks(parts), max_line)]

    return asyncio.run(collect())


# -- SSE -----------------------------------------------------------------------------------------


def test_sse_fields_comments_multiline_data_and_named_events() -> None:
    events = parse_all([
        ": keep-alive", "", "event: message_start", 'data: {"a":1}', "",
        "data: line one", "data:line two", "id: 7", "retry: 10", "",
        "data: tail-without-blank-line",
    ])
    assert events == [
        SSEEvent("message_start", '{"a":1}'),
        SSEEvent("message", "line one\nline two"),
        SSEEvent("message", "tail-without-blank-line"),
    ]


def test_sse_unknown_fields_are_ignored_but_counted() -> None:
    parser = SSEParser()
    assert parser.feed("garbage without a colon") is None
    assert parser.feed("x-field: 1") is None
    assert parser.flush() is None
    assert parser.ignored_lines == 2


def test_sse_llama_cpp_error_line_becomes_error_event() -> None:
    assert parse_all(['error: {"code": 500, "message": "boom"}', ""]) == [
        SSEEvent("error", '{"code": 500, "message": "boom"}')
    ]


def test_lines_split_only_at_cr_lf_crlf_not_unicode_separators() -> None:
    # U+2028 / U+2029 / U+0085 are legal unescaped inside JSON strings: not line ends.
    body = 'data: {"t": "a\u2028b\u2029c\x85d"}\r\n\r\ndata: x\rdata: y\n'.encode()
    assert split_lines([body]) == ['data: {"t": "a\u2028b\u2029c\x85d"}', "", "data: x", "data: y"]


@given(st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_lines_are_the_same_however_the_bytes_are_chunked(cuts: list[int]) -> None:
    body = "data: héllo\r\n\r\nevent: e\ndata: wörld ✓\r\rdata: z\n".encode()
    points = sorted({min(c, len(body)) for c in cuts})
    parts = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert split_lines(parts) == split_lines([body]) == [
        "data: héllo", "", "event: e", "data: wörld ✓", "", "data: z"]


@given(st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_lf_only_lines_split_anywhere_including_inside_characters(cuts: list[int]) -> None:
    # LF-only streams take the one-decode-per-read path: a cut inside a multi-byte
    # character or between lines must not change the lines, nor may U+2028 end one.
    body = 'data: {"t": "hé\u2028✓"}\n\ndata: wörld\n: c\ndata: z'.encode()
    points = sorted({min(c, len(body)) for c in cuts})
    parts = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert split_lines(parts) == [
        'data: {"t": "hé\u2028✓"}', "", "data: wörld", ": c", "data: z"]


def test_overlong_line_and_invalid_utf8_are_malformed() -> None:
    with pytest.raises(MalformedStream, match="longer than"):  # after complete lines, LF-only
        split_lines([b"data: ok\ndata: " + b"x" * 100], max_line=50)
    with pytest.raises(MalformedStream, match="longer than"):
        split_lines([b"data: " + b"x" * 100], max_line=50)
    with pytest.raises(MalformedStream, match="UTF-8"):
        split_lines([b"data: \xff\xfe\n"])


# -- error translation ---------------------------------------------------------------------------


def test_retry_after_seconds_http_date_ms_and_garbage() -> None:
    assert http_errors.parse_retry_after({"retry-after": "7"}) == 7.0
    assert http_errors.parse_retry_after({"retry-after": "1.5"}) == 1.5
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    got = http_errors.parse_retry_after({"retry-after": date}, now=now)
    assert got is not None and 28.0 <= got <= 30.0
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert http_errors.parse_retry_after({"retry-after": past}, now=now) == 0.0
    assert http_errors.parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert http_errors.parse_retry_after({"retry-after": "soon"}) is None
    assert http_errors.parse_retry_after({}) is None
    assert http_errors.parse_retry_after({"retry-after": "99999999"}) == http_errors.MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, b'{"error":{"message":"slow down"}}', RateLimited),
        (413, b"too big", ContextTooLong),
        (400, b'{"error":{"message":"This model\'s maximum context length is 4096"}}',
         ContextTooLong),
        (400, b'{"error":{"code":400,"message":"the request exceeds the available context size'
              b'","type":"exceed_context_size_error"}}', ContextTooLong),
        (400, b'{"error":{"message":"prompt is too long: 300000 tokens"}}', ContextTooLong),
        (400, b'{"error":{"message":"temperature must be <= 2"}}', InvalidRequest),
        (401, b'{"error":{"message":"bad key"}}', InvalidRequest),
        (404, b"not found", InvalidRequest),
        (500, b"kaboom " * 1000, BackendError),
        (503, b'{"detail":"loading model"}', BackendError),
    ],
)
def test_status_mapping(status: int, body: bytes, expected: type[TokenHiveError]) -> None:
    err = http_errors.from_status(status, {"retry-after": "3"}, body[: http_errors.BODY_LIMIT])
    assert type(err) is expected
    assert f"HTTP {status}" in err.message
    assert len(err.message) < http_errors.BODY_LIMIT + 100  # bounded part of the body
    if expected is RateLimited:
        assert err.retry_after == 3.0 and err.retryable
    if expected in (InvalidRequest, ContextTooLong):
        assert not err.retryable


def test_error_body_message_is_extracted() -> None:
    err = http_errors.from_status(500, {}, b'{"error":{"message":"CUDA out of memory"}}')
    assert err.message == "upstream HTTP 500: CUDA out of memory"
    err = http_errors.from_status(502, {}, b"<html>Bad gateway</html>")
    assert "Bad gateway" in err.message


def test_error_objects_in_streams() -> None:
    assert isinstance(http_errors.from_error_object(
        {"type": "rate_limit_error", "message": "x"}), RateLimited)
    assert isinstance(http_errors.from_error_object(
        {"type": "invalid_request_error", "message": "bad"}), InvalidRequest)
    assert isinstance(http_errors.from_error_object(
        {"type": "invalid_request_error", "message": "prompt is too long"}), ContextTooLong)
    assert isinstance(http_errors.from_error_object({"code": 400, "message": "nope"}),
                      InvalidRequest)
    assert type(http_errors.from_error_object(
        {"type": "overloaded_error", "message": "Overloaded"})) is BackendError
    assert type(http_errors.from_error_object("plain string")) is BackendError


def test_transport_errors() -> None:
    req = httpx.Request("POST", "http://x")
    assert isinstance(http_errors.from_transport(httpx.ConnectError("refused", request=req),
                                                 response_started=False), BackendUnavailable)
    assert isinstance(http_errors.from_transport(httpx.ConnectTimeout("t", request=req),
                                                 response_started=False), BackendUnavailable)
    assert isinstance(http_errors.from_transport(httpx.ReadTimeout("t", request=req),
                                                 response_started=True), BackendTimeout)
    lost = http_errors.from_transport(httpx.RemoteProtocolError("incomplete", request=req),
                                      response_started=True)
    assert type(lost) is BackendError and "mid-response" in lost.message
    assert isinstance(http_errors.from_transport(httpx.RemoteProtocolError("x", request=req),
                                                 response_started=False), BackendUnavailable)


# -- request bodies ------------------------------------------------------------------------------

SAMPLING = Sampling(max_tokens=9, temperature=0.5, top_p=0.9, top_k=20, min_p=0.05,
                    repeat_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.2,
                    stop=["\n\n"], seed=42)


def test_openai_body_standard_fields_and_extras_by_dialect() -> None:
    req = Request(id="r", model="m", messages=[Message("user", "hi", name="bob")],
                  sampling=SAMPLING)
    body = request_body(req, model="up", include_usage=True)
    assert body == {
        "model": "up", "messages": [{"role": "user", "content": "hi", "name": "bob"}],
        "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 9,
        "temperature": 0.5, "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "seed": 42, "stop": ["\n\n"],
    }
    llama = request_body(req, model="up", include_usage=False, sampling_extras="llama.cpp")
    assert (llama["top_k"], llama["min_p"], llama["repeat_penalty"]) == (20, 0.05, 1.1)
    assert "stream_options" not in llama
    vllm = request_body(req, model=None, include_usage=True, sampling_extras="vllm",
                        max_tokens_field="max_completion_tokens")
    assert vllm["repetition_penalty"] == 1.1 and "repeat_penalty" not in vllm
    assert "model" not in vllm and vllm["max_completion_tokens"] == 9


def test_openai_body_rejects_empty_requests() -> None:
    with pytest.raises(InvalidRequest):
        request_body(Request(id="r", model="m"), model="m", include_usage=True)
    with pytest.raises(InvalidRequest):
        request_body(Request(id="r", model="m", kind=Kind.COMPLETION), model="m",
                     include_usage=True)


def test_anthropic_body_splits_system_merges_turns_and_defaults_max_tokens() -> None:
    msgs = [Message("system", "be brief"), Message("user", "a"), Message("user", "b"),
            Message("assistant", "c"), Message("system", "and kind"), Message("tool", "42")]
    system, turns = split_system(msgs)
    assert system == "be brief\n\nand kind"
    assert turns == [{"role": "user", "content": "a\n\nb"},
                     {"role": "assistant", "content": "c"}, {"role": "user", "content": "42"}]
    body = messages_body(Request(id="r", model="m", messages=msgs, sampling=SAMPLING), "claude", 77)
    assert body["max_tokens"] == 9 and body["stop_sequences"] == ["\n\n"]
    assert body["top_k"] == 20 and "seed" not in body and "presence_penalty" not in body
    body = messages_body(Request(id="r", model="m", messages=msgs), "claude", 77)
    assert body["max_tokens"] == 77 and "temperature" not in body
    with pytest.raises(InvalidRequest):
        messages_body(Request(id="r", model="m", messages=[Message("system", "x")]), "c", 1)
