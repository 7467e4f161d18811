"""Tools and structured output mapped onto the Anthropic Messages API, both ways.

Out (request body):

- ``tools`` -> ``[{"name", "description", "input_schema"}]``;
- ``tool_choice`` "auto" / "required" / "none" / a named function -> ``{"type": "auto"}`` /
  ``{"type": "any"}`` / ``{"type": "none"}`` / ``{"type": "tool", "name": ...}``;
- an assistant turn's ``tool_calls`` -> ``tool_use`` content blocks (arguments as the
  ``input`` object); a ``tool`` turn -> a user turn's ``tool_result`` block (``tool_use_id``;
  a tool turn without ``tool_call_id`` stays user text);
- ``response_format``: the API has no JSON mode, so it is the usual emulation: one tool named
  after the schema (``input_schema`` = the schema; ``{"type": "object"}`` for json_object),
  forced with ``tool_choice``; its ``tool_use`` input comes back as the answer's text.

In (stream): ``content_block_start`` of a ``tool_use`` block opens a tool call (id, name),
``input_json_delta`` pieces append to its arguments, ``stop_reason: tool_use`` finishes with
``tool_calls``. Tool calls are numbered 0, 1, ... in order, whatever the block indexes are.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Message, Request
from tokenhive.schemas.tools import NamedToolChoice, ToolCallDelta

FORMAT_TOOL_DESCRIPTION = "Give the answer as this tool's input; it is the whole reply."


def format_tool_name(request: Request) -> str | None:
    """The tool that stands for the response format (its input is the answer's text)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    return fmt.json_schema.name if fmt.json_schema is not None else "json_response"


def tools_fields(request: Request) -> dict[str, Any]:
    """The body fields for tools / tool_choice / response_format."""
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        if request.tools:
            raise InvalidRequest(
                "the anthropic backend cannot combine response_format with tools (the format "
                "is emulated with a forced tool)"
            )
        name = format_tool_name(request)
        schema = (fmt.json_schema.schema if fmt.json_schema else None) or {"type": "object"}
        tool = {"name": name, "description": FORMAT_TOOL_DESCRIPTION, "input_schema": schema}
        return {"tools": [tool], "tool_choice": {"type": "tool", "name": name}}
    if not request.tools:
        return {}
    fields: dict[str, Any] = {"tools": [
        {"name": t.function.name, "input_schema": t.function.parameters or {"type": "object"},
         **({"description": t.function.description} if t.function.description else {})}
        for t in request.tools
    ]}
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        fields["tool_choice"] = {"type": "tool", "name": choice.function.name}
    elif choice is not None:
        fields["tool_choice"] = {"type": {"required": "any"}.get(choice, choice)}
    return fields


def _input_of(arguments: str, where: str) -> Any:
    try:
        value = msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        raise InvalidRequest(f"{where}: arguments are not JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: arguments must be a JSON object")
    return value


def content_of(index: int, m: Message) -> str | list[dict[str, Any]]:
    """A message's Anthropic content: plain text, or blocks when it carries tool parts."""
    if m.role == "tool" and m.tool_call_id:  # (without an id it goes as plain user text)
        return [{"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}]
    if m.role == "assistant" and m.tool_calls:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
        blocks += [
            {"type": "tool_use", "id": c.id, "name": c.function.name,
             "input": _input_of(c.function.arguments, f"messages[{index}].tool_calls[{i}]")}
            for i, c in enumerate(m.tool_calls)
        ]
        return blocks
    return m.content


def merged(a: str | list[dict[str, Any]], b: str | list[dict[str, Any]]) -> Any:
    """Two same-role turns as one (the API wants user/assistant alternation)."""
    if isinstance(a, str) and isinstance(b, str):
        return a + "\n\n" + b

    def blocks(c: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"type": "text", "text": c}] if isinstance(c, str) else c

    return blocks(a) + blocks(b)


class ToolBlocks:
    """Turns a stream's tool_use blocks into ToolCallDeltas (or into text, for the tool that
    stands for a response format)."""

    __slots__ = ("_calls", "_format_tool", "_open", "_with_args")

    def __init__(self, format_tool: str | None) -> None:
        self._format_tool = format_tool
        self._calls: dict[int, int] = {}  # block index -> tool call number
        self._open: dict[int, str] = {}  # block index -> input given in the start event
        self._with_args: set[int] = set()  # blocks that received input_json_delta

    def start(self, index: int, block: Any) -> ToolCallDelta | None:
        if block is None or block.type != "tool_use":
            return None
        self._open[index] = msgspec.json.encode(block.input or {}).decode()
        if self._format_tool is not None:
            return None  # its input is text
        n = self._calls[index] = len(self._calls)
        return ToolCallDelta(index=n, id=block.id or f"toolu_{n}", name=block.name or "")

    def piece(self, index: int, partial_json: str) -> tuple[ToolCallDelta | None, str]:
        """(a delta of a tool call, or text of the format tool) for an input_json_delta."""
        if index not in self._open or not partial_json:
            return None, ""
        self._with_args.add(index)
        if self._format_tool is not None:
            return None, partial_json
        return ToolCallDelta(index=self._calls[index], arguments=partial_json), ""

    def stop(self, index: int) -> tuple[ToolCallDelta | None, str]:
        """A block that ended without input pieces carries its start event's input."""
        start_input = self._open.pop(index, None)
        if start_input is None or index in self._with_args:
            return None, ""
        if self._format_tool is not None:
            return None, start_input
        return ToolCallDelta(index=self._calls[index], arguments=start_input), ""

    @property
    def made_calls(self) -> bool:
        return bool(self._calls)
