"""What every HTTP API adapter shares: the pooled client, the key, the error funnel, health.

One ``httpx.AsyncClient`` per backend, its pool sized to the worker's slots (every slot may
hold one upstream stream), HTTP/2 only for https (h2c prior knowledge would break plain
HTTP/1.1 servers). Timeouts: ``connect_timeout`` to open a connection, ``timeout`` as the
longest silence tolerated while reading (a stalled stream fails, a long but live one does
not). A pooled keep-alive connection that the server closed just as we reused it is
retried once on a fresh one (nothing was answered, so nothing runs twice).

Every failure leaves through ``failed``, which is where the upstream's condition is
recorded for ``health()``: a 429 (or any response with Retry-After) makes the worker report
DEGRADED with ``retry_after`` until that time has passed, so the broker sends work elsewhere;
an unreachable upstream does the same for a short, growing backoff, cleared by the next
success.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar, TypeAlias

import httpx
import msgspec

from tokenhive.schemas.config import AnthropicSpec, AzureSpec, OpenAISpec
from tokenhive.schemas.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelLoadFailed,
    RateLimited,
    TokenHiveError,
)
from tokenhive.schemas.messages import Health, Kind
from tokenhive.workers.backend import Backend, BackendInfo, HealthReport
from tokenhive.workers.backends.http import errors as http_errors
from tokenhive.workers.backends.http.secrets import Secret, install_log_guard, load_api_key
from tokenhive.workers.backends.http.transport import LeanHTTPTransport

log = logging.getLogger("tokenhive.workers.http")

HTTPSpec: TypeAlias = OpenAISpec | AnthropicSpec | AzureSpec

DEFAULT_RATE_LIMIT_S = 1.0  # degrade this long after a 429 that names no Retry-After
UNREACHABLE_BACKOFF_S = (0.5, 30.0)  # first and longest degrade after connect failures
MAX_JSON_BODY = 256 * 1024 * 1024  # a non-stream body (embeddings) larger than this is refused
# What a reused connection the server already closed looks like: safe to send once more.
_JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
_SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class UpstreamHealth:
    """The upstream's condition as seen by this adapter, reported in every heartbeat."""

    def __init__(self) -> None:
        self._until = 0.0  # monotonic time the current degrade ends
        self._detail = ""
        self._unreachable = 0  # consecutive connect failures

    def rate_limited(self, retry_after: float | None, detail: str) -> None:
        until = time.monotonic() + (DEFAULT_RATE_LIMIT_S if retry_after is None else retry_after)
        if until > self._until:
            self._until, self._detail = until, detail

    def unreachable(self) -> None:
        first, longest = UNREACHABLE_BACKOFF_S
        backoff = min(first * 2**self._unreachable, longest)
        self._unreachable += 1
        self.rate_limited(backoff, "upstream unreachable")

    def reachable(self) -> None:
        if self._unreachable:
            self._unreachable = 0
            if self._detail == "upstream unreachable":
                self._until = 0.0

    def report(self) -> HealthReport:
        left = self._until - time.monotonic()
        if left <= 0:
            return HealthReport()
        return HealthReport(Health.DEGRADED, detail=self._detail, retry_after=round(left, 3))


class HTTPBackend(Backend, abc.ABC):
    """Base of the OpenAI, Azure and Anthropic adapters."""

    backend_name: ClassVar[str]
    key_required: ClassVar[bool] = False

    def __init__(self, spec: HTTPSpec) -> None:
        self.spec = spec
        self.upstream = UpstreamHealth()
        self._client: httpx.AsyncClient | None = None
        self._key: Secret | None = None

    # -- what subclasses define ----------------------------------------------------------------

    @abc.abstractmethod
    def base_url(self) -> str:
        """The URL every request path is relative to."""

    @abc.abstractmethod
    def auth_headers(self, key: Secret | None) -> dict[str, str]:
        """The headers that carry the key (the only place a key is revealed)."""

    def kinds(self) -> list[Kind]:
        return [Kind.CHAT, Kind.COMPLETION]

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        install_log_guard()
        self._key = load_api_key(
            self.spec.api_key_env, self.spec.api_key_file, required=self.key_required
        )
        url = httpx.URL(self.base_url())
        if url.scheme not in ("http", "https") or not url.host:
            raise ModelLoadFailed(f"{self.backend_name}: not an http(s) URL: {self.base_url()!r}")
        slots = max(1, self.spec.slots)
        self._client = httpx.AsyncClient(
            base_url=url,
            headers={**self.spec.headers, **self.auth_headers(self._key)},
            http2=self.spec.http2 and url.scheme == "https",
            limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
            timeout=httpx.Timeout(self.spec.timeout, connect=self.spec.connect_timeout),
            # Plain http (a local vLLM / llama-server): the lean transport, a fraction of
            # httpcore's CPU per request (see http11.py). TLS and HTTP/2 stay with httpx.
            transport=LeanHTTPTransport(slots) if url.scheme == "http" else None,
        )
        log.info(
            "http backend ready",
            extra={"backend": self.backend_name, "url": str(url), "slots": slots,
                   "key_source": self._key.source if self._key else None},
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.backend_name,
            context_length=self.spec.context_length,
            device="remote",
            kinds=self.kinds(),
        )

    def health(self) -> HealthReport:
        return self.upstream.report()

    def check_kind(self, kind: Kind) -> None:
        if kind not in self.kinds():
            raise InvalidRequest(f"backend {self.backend_name!r} does not serve {kind.value}")

    # -- requests ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def post_stream(
        self, path: str, payload: dict[str, Any], params: dict[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """POST ``payload`` and hold the streaming response open; a non-2xx status or an
        httpx failure (also one raised while the caller reads the body) leaves as a
        tokenhive error. Leaving the block closes the response, which is how a cancelled
        request closes its upstream stream."""
        if self._client is None:
            raise BackendUnavailable(f"{self.backend_name} backend is not started")
        request = self._client.build_request(
            "POST", path, content=msgspec.json.encode(payload), params=params,
            headers=_SSE_HEADERS if payload.get("stream") else _JSON_HEADERS,
        )
        response = await self._send(self._client, request)
        try:
            if not 200 <= response.status_code < 300:
                body = await read_bounded(response, http_errors.BODY_LIMIT)
                raise http_errors.from_status(response.status_code, response.headers, body)
            self.upstream.reachable()
            yield response
        except httpx.HTTPError as exc:
            raise self.failed(http_errors.from_transport(exc, response_started=True)) from exc
        except TokenHiveError as exc:
            raise self.failed(exc) from exc.__cause__
        finally:
            await response.aclose()

    async def _send(self, client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        """Send once. A POST that may have reached the upstream is never re-sent here: on a
        paid API that bills twice. The only safe resend (a *reused* keep-alive connection that
        closed before any response byte) is made by the transport that knows which connection
        it used: ours for http:// (``transport.py``); for https://, httpcore drops a pooled
        connection it finds closed before reusing it."""
        try:
            return await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self.failed(http_errors.from_transport(exc, response_started=False)) from exc

    async def post_json(
        self, path: str, payload: dict[str, Any], params: dict[str, str] | None = None
    ) -> Any:
        """POST and decode a whole JSON response (non-streaming endpoints)."""
        async with self.post_stream(path, payload, params) as response:
            body = await read_bounded(response, MAX_JSON_BODY + 1)
            if len(body) > MAX_JSON_BODY:
                raise http_errors.malformed(f"response body larger than {MAX_JSON_BODY} bytes")
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise self.failed(http_errors.malformed("body is not JSON", body[:200].decode(
                "utf-8", "replace"))) from None

    def failed(self, exc: TokenHiveError) -> TokenHiveError:
        """Record what an error says about the upstream, then hand it back to be raised."""
        if isinstance(exc, RateLimited):
            self.upstream.rate_limited(exc.retry_after, "rate limited upstream")
        elif exc.retry_after is not None:  # e.g. 503/529 with Retry-After: overloaded
            self.upstream.rate_limited(exc.retry_after, "upstream asked us to back off")
        elif isinstance(exc, BackendUnavailable):
            self.upstream.unreachable()
        log.debug("upstream error", extra={"backend": self.backend_name, "code": exc.code.value,
                                           "error": exc.message})
        return exc


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body (an error page can be huge)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]
