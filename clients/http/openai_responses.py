"""Results and Chunks -> OpenAI's JSON bodies and SSE events.

Non-streaming: ``response_body`` gives the ``chat.completion`` / ``text_completion`` /
embedding ``list`` object. Streaming: ``SseFramer`` frames one request's events the way OpenAI
does: for chat a first delta carrying the role, then content deltas, a chunk with the
``finish_reason``, the usage chunk (``choices: []``) when ``include_usage``, then
``data: [DONE]``. Each content event is a prefix and suffix built once per request around the
JSON-encoded text, since this is the per-token path.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import msgspec

from tokenhive.clients.result import Result
from tokenhive.schemas.messages import Kind, Usage
from tokenhive.schemas.tools import ToolCall, ToolCallDelta

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.encode


def response_id(kind: Kind, request_id: str) -> str:
    return f"chatcmpl-{request_id}" if kind is Kind.CHAT else f"cmpl-{request_id}"


def usage_body(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def response_body(kind: Kind, result: Result, model: str, *, encoding_format: str = "float",
                  created: int | None = None) -> dict[str, Any]:
    """The whole answer of a non-streaming request, as OpenAI's body for ``kind``."""
    created = int(time.time()) if created is None else created
    if kind is Kind.EMBEDDING:
        return embedding_list(result.embeddings or [], result.usage, model, encoding_format)
    if kind is Kind.CHAT:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            message["tool_calls"] = [tool_call_body(c) for c in result.tool_calls]
            message["content"] = result.text or None  # OpenAI: null beside tool calls
        chat_choice = {"index": 0, "message": message, "logprobs": None,
                       "finish_reason": result.finish_reason}
        return {"id": response_id(kind, result.id), "object": "chat.completion",
                "created": created, "model": model, "choices": [chat_choice],
                "usage": usage_body(result.usage)}
    text_choice = {"index": 0, "text": result.text, "logprobs": None,
                   "finish_reason": result.finish_reason}
    return {"id": response_id(kind, result.id), "object": "text_completion",
            "created": created, "model": model, "choices": [text_choice],
            "usage": usage_body(result.usage)}


def tool_call_body(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments}}


def tool_call_delta_body(delta: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed piece of a call: the first names its id, type and function name;
    later ones carry only the index and more argument text."""
    function: dict[str, str] = {"arguments": delta.arguments}
    body: dict[str, Any] = {"index": delta.index, "function": function}
    if delta.id:
        body["id"] = delta.id
        body["type"] = "function"
    if delta.name:
        function["name"] = delta.name
    return body


def embedding_list(vectors: list[list[float]], usage: Usage, model: str,
                   encoding_format: str = "float") -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens}}


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: little-endian float32, base64
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class SseFramer:
    """The SSE events of one streamed chat or completion request."""

    def __init__(self, kind: Kind, request_id: str, model: str, *,
                 include_usage: bool = False, created: int | None = None) -> None:
        self.kind = kind
        self.include_usage = include_usage
        head: dict[str, Any] = {
            "id": response_id(kind, request_id),
            "object": "chat.completion.chunk" if kind is Kind.CHAT else "text_completion",
            "created": int(time.time()) if created is None else created,
            "model": model,
        }
        self._head = head
        tail = b',"usage":null}' if include_usage else b"}"
        # b'data: {"id":...,"model":"m","choices":[{"index":0,"delta":{"content":' + text + ...
        opening = b"data: " + _encode(head)[:-1] + b',"choices":[{"index":0,'
        if kind is Kind.CHAT:
            self._prefix = opening + b'"delta":{"content":'
            self._suffix = b'},"logprobs":null,"finish_reason":null}]' + tail + b"\n\n"
        else:
            self._prefix = opening + b'"text":'
            self._suffix = b',"logprobs":null,"finish_reason":null}]' + tail + b"\n\n"

    def start(self) -> bytes:
        """Chat's first event: the assistant role with empty content. Completions: none."""
        if self.kind is not Kind.CHAT:
            return b""
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def delta(self, text: str) -> bytes:
        return self._prefix + _encode(text) + self._suffix

    def tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        """A chat event carrying pieces of the answer's tool calls."""
        return self._event([{"index": 0, "delta": {
            "tool_calls": [tool_call_delta_body(d) for d in deltas]},
            "logprobs": None, "finish_reason": None}])

    def finish(self, finish_reason: str, usage: Usage) -> bytes:
        """The finish_reason event, the usage event if asked for, and [DONE]."""
        if self.kind is Kind.CHAT:
            choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        out = self._event([choice])
        if self.include_usage:
            out += b"data: " + _encode({**self._head, "choices": [],
                                        "usage": usage_body(usage)}) + b"\n\n"
        return out + DONE

    def _event(self, choices: list[dict[str, Any]]) -> bytes:
        body: dict[str, Any] = {**self._head, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return b"data: " + _encode(body) + b"\n\n"
