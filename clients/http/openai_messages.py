"""Chat messages of an OpenAI body -> tokenhive Messages: roles, text content parts, an
assistant's ``tool_calls`` and a ``tool`` result's ``tool_call_id``. Every problem is a
BadField naming the path (``messages[2].content[0]``)."""

from __future__ import annotations

from typing import Any

from tokenhive.clients.http.errors import BadField
from tokenhive.clients.http.field_errors import convert_field, short
from tokenhive.clients.request_builder import ROLES
from tokenhive.schemas.messages import Message
from tokenhive.schemas.tools import ToolCall


def to_messages(raw: list[Any]) -> list[Message]:
    if not raw:
        raise BadField("messages", "messages must not be empty")
    return [_message(i, item) for i, item in enumerate(raw)]


def _message(i: int, item: object) -> Message:
    where = f"messages[{i}]"
    if not isinstance(item, dict):
        raise BadField(where, f"{where} must be an object", code="invalid_type")
    role = item.get("role")
    role = "system" if role == "developer" else role
    if role not in ROLES:
        raise BadField(f"{where}.role", f"{where}.role {short(role)} is not one of "
                       f"{sorted(ROLES | {'developer'})}")
    if item.get("function_call") is not None:
        raise BadField(f"{where}.function_call", "function_call is the deprecated form of "
                       "tool_calls: send tool_calls", code="unsupported_parameter")
    name, call_id = item.get("name"), item.get("tool_call_id")
    for field, value in (("name", name), ("tool_call_id", call_id)):
        if value is not None and not isinstance(value, str):
            raise BadField(f"{where}.{field}", f"{where}.{field} must be a string",
                           code="invalid_type")
    calls = convert_field(item.get("tool_calls"), list[ToolCall] | None, f"{where}.tool_calls")
    content = item.get("content")
    if content is None and calls:  # an assistant turn that only called tools
        content = ""
    return Message(role=str(role), content=_content(content, where), name=name,
                   tool_calls=calls or None, tool_call_id=call_id)


def _content(raw: object, where: str) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        texts = []
        for j, part in enumerate(raw):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadField(f"{where}.content[{j}]", "only text content parts are "
                               "supported by tokenhive", code="unsupported_parameter")
            if not isinstance(text := part.get("text"), str):
                raise BadField(f"{where}.content[{j}].text", "text must be a string",
                               code="invalid_type")
            texts.append(text)
        return "".join(texts)
    raise BadField(f"{where}.content", f"{where}.content must be a string or a list of text "
                   "parts", code="invalid_type")
