"""OpenAI-compatible HTTP adapter: OpenAI, vLLM, llama-server, llama-cpp-python, Ollama.

Chat and completion requests always stream upstream (``stream: true``), whatever the client
asked for: the runtime assembles non-stream answers, and a streamed upstream call is what
lets a cancel close the connection and stop the server's work. Usage comes from the stream
(``stream_options.include_usage``); a server that sends none gets an estimate marked
``estimated=True``; a server that rejects ``stream_options`` by name (older Azure
api-versions, older servers) is asked again without it, once per backend. A server that
ignores ``stream`` and answers with one JSON body is served too.

Content chunks that arrive together (one network read) become one Delta: the text is
already here, so merging costs no latency and saves a message per token on every hop
downstream. The Delta's token count is the number of chunks merged (one token each).

Everything Azure does differently (URL, key header, api-version, no model field) sits in
``Routes``; ``AzureBackend`` is this class with other routes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NamedTuple

import httpx
import msgspec

from tokenhive.schemas.config import AzureSpec, OpenAISpec
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Kind, Request, Usage
from tokenhive.schemas.tools import ToolCallDelta
from tokenhive.workers.backend import Delta, Done, Embeddings
from tokenhive.workers.backends.estimate import (
    estimate_prompt,
    estimate_tokens,
    estimated_usage,
    finish_reason,
)
from tokenhive.workers.backends.http import errors as http_errors
from tokenhive.workers.backends.http.base import MAX_JSON_BODY, HTTPBackend, read_bounded
from tokenhive.workers.backends.http.openai_wire import (
    Completion,
    EmbeddingList,
    WireUsage,
    completion_decoder,
    embeddings_body,
    request_body,
)
from tokenhive.workers.backends.http.secrets import Secret
from tokenhive.workers.backends.http.sse import (
    MalformedStream,
    SSEEvent,
    drain,
    iter_sse_batches,
    texts_by_batch,
)

log = logging.getLogger("tokenhive.workers.openai")


class Routes(NamedTuple):
    """Where and how to call one OpenAI-style deployment."""

    base_url: str
    paths: dict[Kind, str]
    params: dict[str, str] | None  # query string on every call (Azure's api-version)
    model: str | None  # "model" body field; None for Azure (the deployment names it)
    auth_header: str  # header name carrying the key
    auth_prefix: str  # "Bearer " or ""
    kinds: list[Kind]
    include_usage: bool
    sampling_extras: str
    max_tokens_field: str


def openai_routes(spec: OpenAISpec) -> Routes:
    return Routes(
        base_url=spec.base_url.rstrip("/"),
        paths={Kind.CHAT: spec.chat_path, Kind.COMPLETION: spec.completions_path,
               Kind.EMBEDDING: spec.embeddings_path},
        params=None,
        model=spec.upstream_model or spec.model,
        auth_header="authorization",
        auth_prefix="Bearer ",
        kinds=[Kind(k) for k in spec.kinds],
        include_usage=spec.include_usage,
        sampling_extras=spec.sampling_extras,
        max_tokens_field=spec.max_tokens_field,
    )


class OpenAIBackend(HTTPBackend):
    backend_name = "openai"

    def __init__(self, spec: OpenAISpec) -> None:
        self._setup(spec, openai_routes(spec))

    def _setup(self, spec: OpenAISpec | AzureSpec, routes: Routes) -> None:
        super().__init__(spec)
        self.routes = routes
        self._usage_option = True  # False once the upstream rejected stream_options

    def base_url(self) -> str:
        return self.routes.base_url

    def auth_headers(self, key: Secret | None) -> dict[str, str]:
        if key is None:
            return {}
        return {self.routes.auth_header: self.routes.auth_prefix + key.reveal()}

    def kinds(self) -> list[Kind]:
        return self.routes.kinds

    # -- generation ----------------------------------------------------------------------------

    async def stream(self, request: Request) -> AsyncIterator[Delta | Done]:
        self.check_kind(request.kind)
        r = self.routes
        while True:
            body = request_body(
                request, model=r.model, include_usage=r.include_usage and self._usage_option,
                sampling_extras=r.sampling_extras, max_tokens_field=r.max_tokens_field,
            )
            yielded = False
            try:
                async with self.post_stream(r.paths[request.kind], body, r.params) as response:
                    ctype = response.headers.get("content-type", "")
                    items = self._whole_body if ctype.startswith("application/json") else \
                        self._events
                    async for item in items(response, request):
                        yielded = True
                        yield item
                return
            except InvalidRequest as exc:
                if yielded or "stream_options" not in body or "stream_options" not in exc.message:
                    raise
                # Servers (and Azure api-versions) that predate stream_options reject it by
                # name; go on without it (usage is then estimated) instead of failing all.
                self._usage_option = False
                log.warning("upstream rejects stream_options; usage will be estimated",
                            extra={"backend": self.backend_name})

    async def _events(
        self, response: httpx.Response, request: Request
    ) -> AsyncIterator[Delta | Done]:
        state = _StreamState()
        batches = iter_sse_batches(response)
        try:
            async for texts in texts_by_batch(batches, state.take):
                calls, state.calls = state.calls or None, []
                yield Delta(texts[0] if len(texts) == 1 else "".join(texts), len(texts), calls)
        except MalformedStream as exc:
            raise http_errors.malformed(str(exc)) from None
        if state.done:
            await drain(batches)
        elif state.finish is None:
            ctype = response.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                raise http_errors.malformed(f"expected an event stream, got {ctype or 'no'} "
                                            "content-type")
            raise http_errors.malformed("stream ended before [DONE] (connection cut?)")
        usage = state.usage or estimated_usage(
            estimate_prompt(request.messages, request.prompt), state.pieces)
        yield Done(finish_reason(state.finish), usage)

    async def _whole_body(
        self, response: httpx.Response, request: Request
    ) -> AsyncIterator[Delta | Done]:
        """A server that answered ``stream: true`` with a single JSON body."""
        raw = (await read_bounded(response, MAX_JSON_BODY)).decode("utf-8", "replace")
        parsed = _decode_chunk(raw)
        if parsed.error is not None:
            raise http_errors.from_error_object(parsed.error)
        choice = next((c for c in parsed.choices or () if c.index == 0), None)
        if choice is None:
            raise http_errors.malformed("response has no choices", raw)
        text = choice.content()
        calls = choice.tool_call_deltas() or None
        if parsed.usage is not None and _counted(parsed.usage):
            usage = parsed.usage.to_usage()
        else:
            prompt = estimate_prompt(request.messages, request.prompt)
            usage = estimated_usage(prompt, estimate_tokens(text))
        if text or calls:
            yield Delta(text, usage.completion_tokens, calls)
        yield Done(finish_reason(choice.finish_reason), usage)

    # -- embeddings ----------------------------------------------------------------------------

    async def embed(self, request: Request) -> Embeddings:
        self.check_kind(Kind.EMBEDDING)
        r = self.routes
        raw = await self.post_json(r.paths[Kind.EMBEDDING], embeddings_body(request, r.model),
                                   r.params)
        try:
            result = msgspec.convert(raw, EmbeddingList)
        except msgspec.ValidationError as exc:
            if isinstance(raw, dict) and raw.get("error") is not None:
                raise self.failed(http_errors.from_error_object(raw["error"])) from None
            raise self.failed(http_errors.malformed(f"embedding list: {exc}")) from None
        try:
            vectors = result.vectors()
        except ValueError as exc:
            raise self.failed(http_errors.malformed(str(exc))) from None
        if len(vectors) != len(request.input):
            raise self.failed(http_errors.malformed(
                f"{len(vectors)} embeddings for {len(request.input)} inputs"))
        if result.usage is not None and result.usage.prompt_tokens:
            usage = result.usage.to_usage()
        else:
            usage = estimated_usage(sum(estimate_tokens(t) for t in request.input), 0)
        return Embeddings(vectors, usage)


class _StreamState:
    """What a chat/completion stream has told us so far."""

    __slots__ = ("calls", "done", "finish", "pieces", "usage")

    def __init__(self) -> None:
        self.calls: list[ToolCallDelta] = []  # tool-call deltas not yet handed out
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.pieces = 0  # content chunks: one token each, for the estimate
        self.done = False

    def take(self, event: SSEEvent, texts: list[str]) -> bool:
        """Apply one event, appending its text to ``texts``; True at ``[DONE]``."""
        if event.data == "[DONE]":
            self.done = True
            return True
        if event.event == "error":
            raise http_errors.from_error_object(_error_event(event.data))
        chunk = _decode_chunk(event.data)
        if chunk.error is not None:
            raise http_errors.from_error_object(chunk.error)
        if chunk.usage is not None and _counted(chunk.usage):
            self.usage = chunk.usage.to_usage()
        for choice in chunk.choices or ():
            if choice.index != 0:
                continue
            text = choice.content()
            if text:
                self.pieces += 1
                texts.append(text)
            if (calls := choice.tool_call_deltas()):
                self.pieces += 1
                self.calls += calls
                texts.append("")  # so this batch yields a Delta that carries them
            if choice.finish_reason:
                self.finish = choice.finish_reason
        return False


def _decode_chunk(data: str) -> Completion:
    try:
        return completion_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise http_errors.malformed(f"data is not a completion chunk ({exc})", data) from None


def _counted(usage: WireUsage) -> bool:
    return bool(usage.prompt_tokens or usage.completion_tokens or usage.total_tokens)


def _error_event(data: str) -> object:
    """The error object of an ``error`` event (llama.cpp: ``error: {...}``)."""
    try:
        parsed = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {"message": data}
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed["error"]
    return parsed
