"""Tools in the prompt of a local model.

A chat template that knows tools (``ChatFormatter.native_tools``: it uses the ``tools``
variable) gets them as OpenAI-shaped dicts and renders them its own way. The built-in
formats (gemma, chatml, ...) and templates without tools get them as text instead: a system
turn that lists the functions with their JSON schemas and asks for a call as one JSON object
``{"name": ..., "arguments": {...}}`` (the shape ``tool_output`` reads back and the forcing
grammar produces). Earlier tool calls and tool results become text turns the format can
render: the assistant's calls as the same JSON, a result as a user turn naming its call;
turns of one role that end up adjacent are merged (Gemma's template insists on
user/model alternation).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from tokenhive.schemas.messages import Message, Request
from tokenhive.schemas.tools import Tool

INSTRUCTIONS = (
    "You can call functions. The functions available, as JSON schemas of their arguments:\n"
    "{tools}\n"
    "To call a function, reply with only a JSON object of this form and nothing else:\n"
    '{{"name": "<function name>", "arguments": {{<the arguments>}}}}\n'
    "Otherwise, answer normally."
)


def tools_offered(request: Request) -> bool:
    """Does the model get to see (and maybe call) tools?"""
    return bool(request.tools) and request.tool_choice != "none"


def has_tool_turns(messages: list[Message]) -> bool:
    return any(m.tool_calls or m.role == "tool" for m in messages)


def tool_dicts(tools: list[Tool]) -> list[dict[str, Any]]:
    """OpenAI's shape, as templates expect it."""
    out: list[dict[str, Any]] = msgspec.to_builtins(tools)
    return out


def _call_text(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        args = arguments
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def as_text_turns(messages: list[Message]) -> list[Message]:
    """Tool calls and results as plain turns; adjacent same-role turns merged."""
    out: list[Message] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = "\n".join(_call_text(c.function.name, c.function.arguments)
                              for c in m.tool_calls)
            turn = Message("assistant", f"{m.content}\n{calls}" if m.content else calls)
        elif m.role == "tool":
            which = m.tool_call_id or m.name or "the function call"
            turn = Message("user", f"Result of {which}:\n{m.content}")
        else:
            turn = Message(m.role, m.content, m.name)
        if out and out[-1].role == turn.role and turn.role != "system":
            out[-1] = Message(turn.role, f"{out[-1].content}\n\n{turn.content}")
        else:
            out.append(turn)
    return out


def with_tool_instructions(messages: list[Message], tools: list[Tool]) -> list[Message]:
    """``messages`` as text turns, the tool instructions in (or as) the first system turn."""
    turns = as_text_turns(messages)
    if not tools:
        return turns
    listing = "\n".join(
        json.dumps(d["function"], ensure_ascii=False) for d in tool_dicts(tools)
    )
    text = INSTRUCTIONS.format(tools=listing)
    if turns and turns[0].role == "system":
        turns[0] = Message("system", f"{turns[0].content}\n\n{text}")
    else:
        turns.insert(0, Message("system", text))
    return turns
