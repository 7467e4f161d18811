"""Anthropic Messages API adapter (``POST /v1/messages``, streamed).

Wire differences from OpenAI, all handled here:

- the system prompt is a top-level ``system`` field, not a message; system turns are
  collected (in order) and consecutive turns of one role are merged, since the API wants
  user/assistant turns; tools, tool calls, tool results and response_format are mapped in
  ``anthropic_tools`` (``tool_use`` / ``tool_result`` blocks, ``input_json_delta``);
- ``max_tokens`` is required: ``default_max_tokens`` fills it when the request has none;
- sampling: temperature, top_p, top_k and ``stop_sequences``; the API has no seed or
  penalties, so those are not sent;
- the key goes in ``x-api-key`` with an ``anthropic-version`` header;
- the stream is typed events: ``message_start`` (input usage), ``content_block_delta`` with
  ``text_delta`` (the text), ``message_delta`` (stop_reason, output usage), ``message_stop``,
  ``ping``, and ``error`` (mapped like an HTTP error of the same type);
- stop reasons ``end_turn`` / ``stop_sequence`` -> stop, ``max_tokens`` -> length,
  ``tool_use`` -> tool_calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from tokenhive.schemas.config import AnthropicSpec
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Kind, Message, Request, Usage
from tokenhive.schemas.tools import ToolCallDelta
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends.anthropic_tools import (
    ToolBlocks,
    content_of,
    format_tool_name,
    merged,
    tools_fields,
)
from tokenhive.workers.backends.estimate import (
    CHARS_PER_TOKEN,
    estimate_prompt,
    estimate_tokens,
    estimated_usage,
    finish_reason,
)
from tokenhive.workers.backends.http import errors as http_errors
from tokenhive.workers.backends.http.base import HTTPBackend
from tokenhive.workers.backends.http.secrets import Secret
from tokenhive.workers.backends.http.sse import (
    MalformedStream,
    SSEEvent,
    drain,
    iter_sse_batches,
    texts_by_batch,
)

MESSAGES_PATH = "/v1/messages"


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def prompt_tokens(self) -> int | None:
        if self.input_tokens is None:
            return None
        cached = (self.cache_creation_input_tokens or 0) + (self.cache_read_input_tokens or 0)
        return self.input_tokens + cached


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None  # input_json_delta: a piece of a tool_use's input
    stop_reason: str | None = None


class _Block(msgspec.Struct):
    type: str = ""
    id: str | None = None
    name: str | None = None
    input: Any = None


class _Event(msgspec.Struct):
    type: str = ""
    index: int = 0
    content_block: _Block | None = None
    message: _Message | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_event = msgspec.json.Decoder(_Event).decode


def messages_body(request: Request, model: str, default_max_tokens: int) -> dict[str, Any]:
    """The JSON body of a streamed Messages API call."""
    system, turns = split_system(request.messages)
    if not turns:
        raise InvalidRequest("an anthropic chat request needs at least one user message")
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.sampling.max_tokens or default_max_tokens,
        "messages": turns,
        "stream": True,
    }
    if system:
        body["system"] = system
    s = request.sampling
    optional = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                "stop_sequences": s.stop or None}
    body.update((k, v) for k, v in optional.items() if v is not None)
    body.update(tools_fields(request))
    return body


def split_system(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, user/assistant turns with same-role neighbours merged)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role == "system":
            system.append(m.content)
            continue
        role = "assistant" if m.role == "assistant" else "user"
        content = content_of(i, m)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = merged(turns[-1]["content"], content)
        else:
            turns.append({"role": role, "content": content})
    return "\n\n".join(system), turns


class AnthropicBackend(HTTPBackend):
    backend_name = "anthropic"
    key_required = True

    def __init__(self, spec: AnthropicSpec) -> None:
        super().__init__(spec)
        self.anthropic = spec

    def base_url(self) -> str:
        return self.anthropic.base_url.rstrip("/")

    def auth_headers(self, key: Secret | None) -> dict[str, str]:
        headers = {"anthropic-version": self.anthropic.anthropic_version}
        if key is not None:
            headers["x-api-key"] = key.reveal()
        return headers

    def kinds(self) -> list[Kind]:
        return [Kind.CHAT]  # the Messages API has no raw-completion mode

    async def stream(self, request: Request) -> AsyncIterator[Delta | Done]:
        self.check_kind(request.kind)
        spec = self.anthropic
        body = messages_body(request, spec.upstream_model or spec.model, spec.default_max_tokens)
        async with self.post_stream(MESSAGES_PATH, body) as response:
            async for item in self._events(response, request, format_tool_name(request)):
                yield item

    async def _events(
        self, response: httpx.Response, request: Request, format_tool: str | None
    ) -> AsyncIterator[Delta | Done]:
        state = _StreamState(format_tool)
        batches = iter_sse_batches(response)
        try:
            async for texts in texts_by_batch(batches, state.take):
                calls, state.calls = state.calls or None, []
                tokens = sum(estimate_tokens(t) for t in texts)
                if calls:
                    tokens += sum(estimate_tokens(c.arguments) for c in calls)
                yield Delta("".join(texts), tokens, calls)
        except MalformedStream as exc:
            raise http_errors.malformed(str(exc)) from None
        if not state.stopped:
            raise http_errors.malformed("stream ended before message_stop (connection cut?)")
        await drain(batches)
        reason = finish_reason(state.stop)
        if reason == "tool_calls" and not state.blocks.made_calls:
            reason = "stop"  # the response-format tool: its input was the answer's text
        yield Done(reason, state.usage(request))


class _StreamState:
    """What a Messages stream has told us so far."""

    __slots__ = ("blocks", "calls", "chars", "output_tokens", "prompt_tokens", "stop", "stopped")

    def __init__(self, format_tool: str | None = None) -> None:
        self.blocks = ToolBlocks(format_tool)
        self.calls: list[ToolCallDelta] = []  # tool-call deltas not yet handed out
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None
        self.stop: str | None = None
        self.stopped = False
        self.chars = 0

    def take(self, event: SSEEvent, texts: list[str]) -> bool:
        """Apply one event, appending its text to ``texts``; True at ``message_stop``."""
        parsed = _decode(event.data)
        kind = parsed.type or event.event
        if kind == "content_block_delta":
            text = parsed.delta.text if parsed.delta else None
            if text:  # text_delta; thinking deltas carry no answer text
                self.chars += len(text)
                texts.append(text)
            elif parsed.delta is not None and parsed.delta.partial_json is not None:
                self._tool_part(*self.blocks.piece(parsed.index, parsed.delta.partial_json),
                                texts)
        elif kind == "content_block_start":
            self._tool_part(self.blocks.start(parsed.index, parsed.content_block), "", texts)
        elif kind == "content_block_stop":
            self._tool_part(*self.blocks.stop(parsed.index), texts)
        elif kind == "message_start":
            usage = parsed.message.usage if parsed.message else None
            if usage is not None:
                self.prompt_tokens = usage.prompt_tokens()
        elif kind == "message_delta":
            if parsed.delta is not None and parsed.delta.stop_reason:
                self.stop = parsed.delta.stop_reason
            if parsed.usage is not None:
                self.output_tokens = parsed.usage.output_tokens or self.output_tokens
                self.prompt_tokens = parsed.usage.prompt_tokens() or self.prompt_tokens
        elif kind == "message_stop":
            self.stopped = True
            return True
        elif kind == "error":
            raise http_errors.from_error_object(parsed.error)
        # ping and future event types carry no text
        return False

    def _tool_part(self, call: ToolCallDelta | None, text: str, texts: list[str]) -> None:
        if call is not None:
            self.calls.append(call)
            texts.append("")  # so this batch yields a Delta that carries it
        if text:
            self.chars += len(text)
            texts.append(text)

    def usage(self, request: Request) -> Usage:
        prompt, output = self.prompt_tokens, self.output_tokens
        if prompt is not None and output is not None:
            return Usage(prompt, output, prompt + output)
        return estimated_usage(
            prompt if prompt is not None else estimate_prompt(request.messages, request.prompt),
            output if output is not None else round(self.chars / CHARS_PER_TOKEN),
        )


def _decode(data: str) -> _Event:
    try:
        return _decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise http_errors.malformed(f"data is not an anthropic event ({exc})", data) from None
