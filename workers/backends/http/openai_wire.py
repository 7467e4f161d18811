"""The OpenAI wire format: request bodies out, stream chunks and JSON bodies in.

Used by the OpenAI-compatible adapter and, unchanged, by Azure. Decoding goes through
msgspec Structs that name only the fields we read (unknown ones are skipped without being
built), which is both the fastest path and the validation: a chunk whose ``choices`` is not
a list of objects is a malformed response, not an AttributeError three calls later.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Kind, Message, Request, Usage
from tokenhive.schemas.tools import ToolCallDelta

# -- request bodies ------------------------------------------------------------------------------

_EXTRAS: dict[str, dict[str, str]] = {
    # Sampling field -> the server's name for it, per dialect ("none" sends no extras).
    "llama.cpp": {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty"},
    "vllm": {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty"},
}


def request_body(
    request: Request,
    *,
    model: str | None,
    include_usage: bool,
    sampling_extras: str = "none",
    max_tokens_field: str = "max_tokens",
) -> dict[str, Any]:
    """The JSON body of a streamed chat or completion request."""
    body: dict[str, Any] = {} if model is None else {"model": model}
    if request.kind == Kind.CHAT:
        if not request.messages:
            raise InvalidRequest("a chat request needs at least one message")
        body["messages"] = [_message(m) for m in request.messages]
        if request.tools:
            body["tools"] = msgspec.to_builtins(request.tools)
        if request.tool_choice is not None:
            body["tool_choice"] = msgspec.to_builtins(request.tool_choice)
    elif request.kind == Kind.COMPLETION:
        if request.prompt is None:
            raise InvalidRequest("a completion request needs a prompt")
        body["prompt"] = request.prompt
    else:
        raise InvalidRequest(f"{request.kind.value} is not a generation request")
    if request.response_format is not None:
        body["response_format"] = msgspec.to_builtins(request.response_format)
    body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    s = request.sampling
    standard: dict[str, Any] = {
        max_tokens_field: s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
        "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
        "seed": s.seed, "stop": s.stop or None,
    }
    for name, their_name in _EXTRAS.get(sampling_extras, {}).items():
        standard[their_name] = getattr(s, name)
    body.update((k, v) for k, v in standard.items() if v is not None)
    return body


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = msgspec.to_builtins(m.tool_calls)
        if not m.content:
            out["content"] = None  # OpenAI's shape of a turn that only calls tools
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def embeddings_body(request: Request, model: str | None) -> dict[str, Any]:
    if not request.input:
        raise InvalidRequest("an embedding request needs at least one input")
    body: dict[str, Any] = {} if model is None else {"model": model}
    body["input"] = request.input
    body["encoding_format"] = "float"
    return body


# -- responses -----------------------------------------------------------------------------------


class WireUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def to_usage(self) -> Usage:
        total = self.total_tokens or self.prompt_tokens + self.completion_tokens
        return Usage(self.prompt_tokens, self.completion_tokens, total)


class _FunctionPart(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallPart(msgspec.Struct):
    """A streamed tool-call delta, or (``index`` unset) a whole call of a message."""

    index: int | None = None
    id: str | None = None
    function: _FunctionPart | None = None

    def to_delta(self, position: int) -> ToolCallDelta:
        f = self.function
        return ToolCallDelta(
            index=self.index if self.index is not None else position, id=self.id or "",
            name=(f.name or "") if f else "", arguments=(f.arguments or "") if f else "",
        )


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallPart] | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallPart] | None = None


class Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None  # chat stream
    message: _Message | None = None  # chat, non-stream
    text: str | None = None  # completions
    finish_reason: str | None = None

    def tool_call_deltas(self) -> list[ToolCallDelta]:
        parts = (self.delta.tool_calls if self.delta is not None else
                 self.message.tool_calls if self.message is not None else None)
        return [p.to_delta(i) for i, p in enumerate(parts or ())]

    def content(self) -> str:
        if self.delta is not None:
            return self.delta.content or ""
        if self.message is not None:
            return self.message.content or ""
        return self.text or ""


class Completion(msgspec.Struct):
    """A stream chunk, or a whole non-stream response (same shape, message for delta)."""

    choices: list[Choice] | None = None
    usage: WireUsage | None = None
    error: Any = None  # an error object some servers send inside a 200 stream


class _Embedding(msgspec.Struct):
    # list[float], or list[list[float]] from a server whose model has no pooling
    # (llama-cpp-python then returns one vector per token); msgspec cannot tell two list
    # types apart in a union, so the shape is checked in pooled().
    embedding: list[Any]
    index: int = 0

    def pooled(self) -> list[float]:
        """One vector: the item itself, or the mean of per-token vectors (mean is the
        pooling tokenhive's own GGUF backend uses when none is named)."""
        vec = self.embedding
        if all(isinstance(x, int | float) for x in vec):
            return [float(x) for x in vec]
        if vec and all(isinstance(row, list) and len(row) == len(vec[0]) for row in vec):
            n = len(vec)
            return [sum(float(x) for x in col) / n for col in zip(*vec, strict=True)]
        raise ValueError("embedding is neither a vector nor a list of equal-length vectors")


class EmbeddingList(msgspec.Struct):
    data: list[_Embedding]
    usage: WireUsage | None = None

    def vectors(self) -> list[list[float]]:
        return [item.pooled() for item in sorted(self.data, key=lambda e: e.index)]


completion_decoder = msgspec.json.Decoder(Completion)
embedding_list_type = EmbeddingList
