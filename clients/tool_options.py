"""The ``tools`` / ``tool_choice`` / ``response_format`` options of a call, and the tool parts
of chat messages, from OpenAI-style dicts (or the schema Structs) to validated Structs.

Bad input is ``InvalidRequest`` naming the option and the field, raised before anything is
sent; the broker checks the same shapes on decode and its size caps on arrival.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.tools import (
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
    tools_problem,
)
from tokenhive.schemas.validation import field_message

T = TypeVar("T")

ToolsArg = Sequence[Tool | Mapping[str, Any]]
ToolChoiceArg = str | NamedToolChoice | Mapping[str, Any]
ResponseFormatArg = ResponseFormat | Mapping[str, Any]


def _convert(value: object, into: Any, name: str) -> Any:
    """``value`` (Structs or plain dicts/lists) as ``into``, checked like a decode."""
    try:
        return msgspec.convert(msgspec.to_builtins(value), into)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid {field_message(exc, name)}") from None
    except TypeError as exc:  # to_builtins: something that is not data at all
        raise InvalidRequest(f"invalid {name}: {exc}") from None


def to_tools(tools: ToolsArg | None) -> list[Tool]:
    if tools is None:
        return []
    if isinstance(tools, str | bytes | Mapping):
        raise InvalidRequest("tools must be a list of tool definitions")
    out: list[Tool] = _convert(list(tools), list[Tool], "tools")
    return out


def to_tool_choice(choice: ToolChoiceArg | None) -> ToolChoice | None:
    if choice is None:
        return None
    out: ToolChoice = _convert(choice, ToolChoice, "tool_choice")
    return out


def to_response_format(fmt: ResponseFormatArg | None) -> ResponseFormat | None:
    if fmt is None:
        return None
    out: ResponseFormat = _convert(fmt, ResponseFormat, "response_format")
    return out


def check_tools(tools: list[Tool], choice: ToolChoice | None) -> None:
    problem = tools_problem(tools, choice)
    if problem is not None:
        raise InvalidRequest(problem)


def message_tool_parts(
    index: int, item: Mapping[str, object]
) -> tuple[list[ToolCall] | None, str | None]:
    """The ``tool_calls`` and ``tool_call_id`` of an OpenAI-style message dict."""
    calls, call_id = item.get("tool_calls"), item.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise InvalidRequest(f"messages[{index}].tool_call_id must be a string")
    if calls is None:
        return None, call_id
    parsed: list[ToolCall] = _convert(calls, list[ToolCall], f"messages[{index}].tool_calls")
    return parsed, call_id
