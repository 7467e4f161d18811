"""Turn the keyword arguments of ``chat``/``complete``/``stream``/``embed`` into a Request.

Bad input raises ``InvalidRequest`` here, before anything is sent, so a caller's typo never
reaches the broker and never costs a round trip. Value ranges are not written out here: the
built Request is checked against the constraints of its own types (``validated``), the same
rules the broker applies when it decodes it. Size caps are the broker's (its config).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import TypedDict

from tokenhive.clients.tool_options import (
    ResponseFormatArg,
    ToolChoiceArg,
    ToolsArg,
    check_tools,
    message_tool_parts,
    to_response_format,
    to_tool_choice,
    to_tools,
)
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Kind, Message, Priority, Request, Sampling
from tokenhive.schemas.validation import validated

ROLES = frozenset({"system", "user", "assistant", "tool"})

MessagesArg = str | Sequence[Message | Mapping[str, object]]


class RequestOptions(TypedDict, total=False):
    """Options every generating call accepts (all optional)."""

    model: str
    system: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: str | list[str]
    seed: int
    sampling: Sampling  # a whole Sampling; the single fields above override its fields
    timeout: float  # seconds for the whole request, retries included
    request_id: str
    priority: int
    metadata: dict[str, str]
    tools: ToolsArg  # OpenAI-style function tools (chat only)
    tool_choice: ToolChoiceArg  # "none" | "auto" | "required" | {"type": "function", ...}
    response_format: ResponseFormatArg  # {"type": "json_object"} | {"type": "json_schema", ...}
    profile: str  # a [profiles.NAME] of the broker: its model, defaults and budgets


class EmbedOptions(TypedDict, total=False):
    model: str
    profile: str
    timeout: float
    request_id: str
    priority: int
    metadata: dict[str, str]


_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
    "presence_penalty", "frequency_penalty", "seed",
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def to_messages(messages: MessagesArg, system: str | None = None) -> list[Message]:
    """Accept a bare user string, Message structs, or OpenAI-style dicts."""
    if isinstance(messages, str):
        out = [Message(role="user", content=messages)]
    else:
        out = [_to_message(i, m) for i, m in enumerate(messages)]
    if system is not None:
        out.insert(0, Message(role="system", content=system))
    if not out:
        raise InvalidRequest("messages must not be empty")
    return out


def _to_message(index: int, item: Message | Mapping[str, object]) -> Message:
    if isinstance(item, Message):
        msg = item
    elif isinstance(item, Mapping):
        role, content, name = item.get("role"), item.get("content"), item.get("name")
        calls, call_id = message_tool_parts(index, item)
        if content is None and calls:  # an assistant turn that only calls tools
            content = ""
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequest(f"messages[{index}] needs string 'role' and 'content'")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"messages[{index}].name must be a string")
        msg = Message(role=role, content=content, name=name, tool_calls=calls,
                      tool_call_id=call_id)
    else:
        raise InvalidRequest(f"messages[{index}] is a {type(item).__name__}, not a message")
    if msg.role not in ROLES:
        raise InvalidRequest(f"messages[{index}].role {msg.role!r} is not one of {sorted(ROLES)}")
    return msg


def to_sampling(options: RequestOptions) -> Sampling:
    base = options.get("sampling") or Sampling()
    fields: dict[str, object] = {f: getattr(base, f) for f in base.__struct_fields__}
    for name in _SAMPLING_FIELDS:
        if name in options and options[name] is not None:  # type: ignore[literal-required]
            fields[name] = options[name]  # type: ignore[literal-required]
    stop = options.get("stop")
    if stop is not None:
        fields["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return Sampling(**fields)  # type: ignore[arg-type]  # ranges: build_request checks


def build_request(
    kind: Kind,
    default_model: str | None,
    options: RequestOptions | EmbedOptions,
    *,
    messages: list[Message] | None = None,
    prompt: str | None = None,
    inputs: list[str] | None = None,
    stream: bool = True,
    default_profile: str | None = None,
) -> Request:
    model = options.get("model") or default_model
    profile = options.get("profile") or default_profile
    if not model and not profile:  # a profile may name the model (the broker applies it)
        raise InvalidRequest("no model given (pass model=... or profile=..., or set the "
                             "client's default model or profile)")
    timeout = options.get("timeout")
    if timeout is not None and timeout <= 0:
        raise InvalidRequest(f"timeout must be > 0, got {timeout}")
    request_id = options.get("request_id") or new_request_id()
    sampling = to_sampling(options) if kind is not Kind.EMBEDDING else Sampling()  # type: ignore[arg-type]
    tools = to_tools(options.get("tools"))  # type: ignore[arg-type]
    tool_choice = to_tool_choice(options.get("tool_choice"))  # type: ignore[arg-type]
    if (tools or tool_choice is not None) and kind is not Kind.CHAT:
        raise InvalidRequest("tools and tool_choice are for chat requests")
    check_tools(tools, tool_choice)
    response_format = to_response_format(options.get("response_format"))  # type: ignore[arg-type]
    if response_format is not None and kind is Kind.EMBEDDING:
        raise InvalidRequest("response_format is for chat and completion requests")
    return validated(Request(
        id=request_id, model=model or "", kind=kind, messages=messages or [], prompt=prompt,
        input=inputs or [], sampling=sampling, stream=stream,
        priority=int(options.get("priority", Priority.NORMAL)), timeout=timeout,
        metadata=dict(options.get("metadata") or {}), tools=tools, tool_choice=tool_choice,
        response_format=response_format, profile=profile,
    ))


def to_inputs(inputs: str | Sequence[str]) -> list[str]:
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    if not items:
        raise InvalidRequest("embedding input must not be empty")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidRequest(f"input[{i}] is a {type(item).__name__}, not a string")
    return items
