"""OpenAI request bodies -> tokenhive Requests, decoded and checked by msgspec.

One Struct per endpoint body. Value ranges are the wire types' own (``schemas.messages``), so
a bad ``temperature`` is refused here with the same rule the broker applies, and every problem
is a ``BadField`` whose ``param`` names the field (``messages[2].content``), OpenAI's way.

- Unknown fields are refused (``unknown_parameter``), as OpenAI does: a misspelt option must
  not be silently dropped.
- Tools (``tools``, ``tool_choice``, assistant ``tool_calls`` and ``tool`` results) and
  structured output (``response_format``) go to the pool as they are (``schemas/tools.py``
  holds OpenAI's shapes); the worker's backend honours them.
- Known fields tokenhive cannot honour (n > 1, logit_bias, logprobs, audio, the deprecated
  ``functions``, ...) are refused (``unsupported_parameter``) unless they hold their no-op
  value (``n: 1``, ``logit_bias: {}``).
- Harmless fields (user, metadata, store, ...) are accepted and ignored.
- ``profile`` (tokenhive's own) names a ``[profiles.NAME]`` of the pool: its defaults, tool set
  and budgets apply as for any other client.

``parse_body(kind, raw)`` is the entry point: ``raw`` is the request's bytes, or an already
decoded JSON object (a Batch API line's ``body``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from tokenhive.clients.http.errors import BadField
from tokenhive.clients.http.field_errors import bad_field_of, short
from tokenhive.clients.http.openai_messages import to_messages
from tokenhive.clients.request_builder import new_request_id
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import (
    Kind,
    MaxTokens,
    MinP,
    Penalty,
    Priority,
    RepeatPenalty,
    Request,
    Sampling,
    Seed,
    Temperature,
    TopK,
    TopP,
)
from tokenhive.schemas.tools import ResponseFormat, Tool, ToolChoice, tools_problem
from tokenhive.schemas.validation import validated

ENCODINGS = ("float", "base64")


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    include_obfuscation: bool = False  # obfuscation pads chunks; we send none: harmless


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    # tokenhive's extension: a ``[profiles.NAME]`` of the pool (the openai SDK sends it with
    # ``extra_body={"profile": "planner"}``); the broker applies it and checks its budgets
    profile: str | None = None
    # harmless: accepted and ignored
    user: str | None = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None


class _Generation(_Common, kw_only=True, forbid_unknown_fields=True):
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # llama.cpp extras
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # not honoured: refused unless no-op (see _NO_OP)
    n: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None


class ChatBody(_Generation, kw_only=True, forbid_unknown_fields=True):
    messages: list[Any]
    max_completion_tokens: MaxTokens | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    # a hint: the model may make several calls in one answer; one or several are both valid
    parallel_tool_calls: bool | None = None
    functions: Any = None  # the deprecated form of tools
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class CompletionBody(_Generation, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]
    suffix: Any = None
    echo: Any = None
    best_of: Any = None


class EmbeddingBody(_Common, kw_only=True, forbid_unknown_fields=True):
    input: str | list[Any]
    encoding_format: str | None = None
    dimensions: Any = None


BODY_TYPES: dict[Kind, type[_Common]] = {
    Kind.CHAT: ChatBody, Kind.COMPLETION: CompletionBody, Kind.EMBEDDING: EmbeddingBody,
}


def _is(*allowed: object) -> Callable[[object], bool]:
    return lambda value: value is None or any(value == a and type(value) is type(a)
                                              for a in allowed)


#: field -> whether its value asks for nothing tokenhive would have to do
_NO_OP: dict[str, Callable[[object], bool]] = {
    "n": _is(1),
    "logit_bias": _is({}),
    "logprobs": _is(False, 0),
    "top_logprobs": _is(0),
    "functions": _is([]),
    "function_call": _is("none", "auto"),
    "audio": _is(),
    "modalities": _is(["text"]),
    "prediction": _is(),
    "reasoning_effort": _is(),
    "web_search_options": _is(),
    "suffix": _is(""),
    "echo": _is(False),
    "best_of": _is(1),
    "dimensions": _is(),
}


class Parsed(msgspec.Struct, kw_only=True):
    """A checked body: the Request to submit and how to answer it."""

    request: Request
    stream: bool = False
    include_usage: bool = False
    encoding_format: str = "float"  # embeddings


def parse_body(kind: Kind, raw: bytes | object, *, priority: int = Priority.NORMAL,
               timeout: float | None = None) -> Parsed:
    """Decode and check one endpoint body; ``BadField`` (a 400 naming the field) if wrong."""
    body = decode(kind, raw)
    for name, no_op in _NO_OP.items():
        value = getattr(body, name, None)
        if not no_op(value):
            raise BadField(name, f"{name}={short(value)} is not supported by tokenhive",
                           code="unsupported_parameter")
    if not body.model:
        raise BadField("model", "model must not be empty")
    request = Request(id=new_request_id(), model=body.model, kind=kind, priority=priority,
                      timeout=timeout, stream=False, profile=body.profile or None)
    parsed = Parsed(request=request)
    if isinstance(body, EmbeddingBody):
        request.input = _inputs(body.input)
        fmt = body.encoding_format or "float"
        if fmt not in ENCODINGS:
            raise BadField("encoding_format", f"encoding_format must be float or base64, "
                           f"got {short(fmt)}")
        parsed.encoding_format = fmt
    else:
        assert isinstance(body, _Generation)
        if isinstance(body, ChatBody):
            request.messages = to_messages(body.messages)
            _tools(body, request)
        else:
            assert isinstance(body, CompletionBody)
            request.prompt = _prompt(body.prompt)
        request.sampling = _sampling(body)
        parsed.stream = request.stream = bool(body.stream)
        if body.stream_options is not None:
            if not parsed.stream:
                raise BadField("stream_options", "stream_options is only allowed with stream")
            parsed.include_usage = body.stream_options.include_usage
    try:
        validated(request)  # the same rules the broker applies, before a round trip
    except InvalidRequest as exc:
        raise BadField(None, exc.message) from None
    return parsed


def decode(kind: Kind, raw: bytes | object) -> _Common:
    body_type = BODY_TYPES[kind]
    try:
        if isinstance(raw, bytes | bytearray | memoryview):
            return msgspec.json.decode(raw, type=body_type)
        return msgspec.convert(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise bad_field_of(exc) from None
    except msgspec.DecodeError as exc:
        raise BadField(None, f"the request body is not valid JSON: {exc}",
                       code="invalid_json") from None


def _tools(body: ChatBody, request: Request) -> None:
    request.tools = list(body.tools or [])
    request.tool_choice = body.tool_choice
    fmt = body.response_format
    request.response_format = None if fmt is None or fmt.type == "text" else fmt
    problem = tools_problem(request.tools, request.tool_choice)
    if problem is not None:
        raise BadField("tools" if problem.startswith("tools") else "tool_choice", problem)


def _prompt(raw: str | list[Any]) -> str:
    if isinstance(raw, str):
        return raw
    if len(raw) == 1 and isinstance(raw[0], str):
        return raw[0]
    if raw and all(isinstance(p, str) for p in raw):
        raise BadField("prompt", "several prompts in one request are not supported by "
                       "tokenhive: send one request per prompt", code="unsupported_parameter")
    raise BadField("prompt", "prompt must be a string (token arrays are not supported)",
                   code="invalid_type")


def _inputs(raw: str | list[Any]) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not items:
        raise BadField("input", "input must not be empty")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadField(f"input[{i}]", "input must be a string or a list of strings "
                           "(token arrays are not supported)", code="invalid_type")
    return list(items)


def _sampling(body: _Generation) -> Sampling:
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens  # the newer name wins, as at OpenAI
    stop = body.stop
    return Sampling(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        stop=[stop] if isinstance(stop, str) else list(stop or []), seed=body.seed,
    )
