"""The one place where HTTP failures become tokenhive errors, for every HTTP backend.

============================================  =============================================
what happened                                 raised
============================================  =============================================
connect failed / refused / connect timed out  BackendUnavailable  (retryable)
other timeout (read, write, pool)             BackendTimeout      (retryable)
connection lost after the response started    BackendError        (retryable)
429                                           RateLimited(retry_after from the server)
413; 400/422 saying the context is too long   ContextTooLong      (not retryable)
other 4xx                                     InvalidRequest      (not retryable)
5xx (and anything else)                       BackendError with a bounded part of the body
an error object inside a 200 stream           mapped by its type/code the same way
malformed body or stream                      BackendError saying so
============================================  =============================================

Every message built from upstream text passes through ``secrets.scrub`` first, so a body that
echoes the API key back cannot carry it into an error, a log line or the wire.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx
import msgspec

from tokenhive.schemas.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextTooLong,
    InvalidRequest,
    RateLimited,
    TokenHiveError,
)
from tokenhive.workers.backends.http.secrets import scrub

BODY_LIMIT = 2048  # bytes of an error body read and quoted
MAX_RETRY_AFTER = 3600.0  # a bogus header must not park a worker for days

_CONTEXT = re.compile(
    r"context[ _-]?(length|window|size)|maximum context|prompt is too long|too many tokens"
    r"|exceed_context|input is too long|reduce the length",
    re.IGNORECASE,
)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI/Azure) or ``Retry-After`` (seconds
    or an HTTP date). None when absent or unparseable; clamped to [0, MAX_RETRY_AFTER]."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return _clamp(float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        return _clamp(float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return _clamp(when.timestamp() - (time.time() if now is None else now))


def _clamp(seconds: float) -> float | None:
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def body_message(body: bytes) -> str:
    """The human part of an error body: ``error.message`` / ``message`` / ``detail`` of a
    JSON body when there is one, else the (bounded) text. Always scrubbed."""
    text = body[:BODY_LIMIT].decode("utf-8", errors="replace").strip()
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return scrub(text)
    message = _message_of(parsed)
    return scrub(message[:BODY_LIMIT] if message else text)


def _message_of(parsed: Any) -> str:
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
        for key in ("message", "detail"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])
    return ""


def from_status(status: int, headers: Mapping[str, str], body: bytes) -> TokenHiveError:
    """The error for a non-2xx response (``body``: at most BODY_LIMIT bytes of it)."""
    detail = body_message(body)
    text = f"upstream HTTP {status}: {detail}" if detail else f"upstream HTTP {status}"
    retry_after = parse_retry_after(headers)
    if status == 429:
        return RateLimited(text, retry_after=retry_after)
    if status == 413 or (status in (400, 422) and _CONTEXT.search(detail)):
        return ContextTooLong(text)
    if 400 <= status < 500:
        return InvalidRequest(text)
    return BackendError(text, retry_after=retry_after)


def from_error_object(error: Any) -> TokenHiveError:
    """The error for an error object sent inside a stream or a 200 body.

    OpenAI / vLLM / llama.cpp send ``{"message", "type", "code"}`` (code a status number or
    a name); Anthropic sends ``{"type": "rate_limit_error", "message"}``.
    """
    if not isinstance(error, dict):
        return BackendError(f"upstream error: {scrub(str(error))[:BODY_LIMIT]}")
    message = scrub(str(error.get("message") or error.get("type") or "unknown error"))
    message = message[:BODY_LIMIT]
    kind = f"{error.get('type', '')} {error.get('code', '')}".lower()
    text = f"upstream error: {message}"
    code = error.get("code")
    if "rate_limit" in kind or code == 429:
        return RateLimited(text)
    if _CONTEXT.search(message) or "context" in kind:
        return ContextTooLong(text)
    if "invalid_request" in kind or "not_found" in kind or (
        isinstance(code, int) and 400 <= code < 500
    ):
        return InvalidRequest(text)
    return BackendError(text)


def from_transport(exc: httpx.HTTPError, *, response_started: bool) -> TokenHiveError:
    """The error for an httpx exception; ``response_started`` tells a lost stream from a
    server we never reached."""
    what = type(exc).__name__
    detail = scrub(str(exc))[:BODY_LIMIT] or what
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return BackendUnavailable(f"cannot connect to upstream ({what}: {detail})")
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"upstream timed out ({what})")
    if isinstance(exc, httpx.TransportError):
        if response_started:
            return BackendError(f"upstream connection lost mid-response ({what}: {detail})")
        return BackendUnavailable(f"upstream closed the connection ({what}: {detail})")
    return BackendError(f"upstream HTTP failure ({what}: {detail})")


def malformed(what: str, sample: str = "") -> BackendError:
    """A response we cannot parse: says so, quoting a bounded, scrubbed sample."""
    tail = f": {scrub(sample[:200])!r}" if sample else ""
    return BackendError(f"malformed upstream response: {what}{tail}")
