"""The llama.cpp grammar (GBNF text) that a request's output must follow, if any.

- ``response_format: json_schema`` -> the schema through llama-cpp-python's JSON-schema
  converter (``llama_cpp.llama_grammar.json_schema_to_gbnf``), so the output parses and
  validates against the schema (when it is not cut short by ``max_tokens`` or a stop string);
- ``response_format: json_object`` -> llama.cpp's generic JSON grammar (an object at the root);
- ``tool_choice: "required"`` or a named function -> one JSON object
  ``{"name": <an offered function>, "arguments": <its parameters schema>}``: a valid call
  by construction (``tool_output.forced_call`` reads it back).

The converter's string rule lets raw control characters (a newline, a tab) into strings,
which JSON forbids; it is tightened to JSON's rule before use, as llama.cpp's own C++
converter has it. A schema the converter cannot handle is ``InvalidRequest`` naming it.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Request
from tokenhive.schemas.tools import Tool, tool_choice_name

_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def schema_grammar(schema: dict[str, Any], where: str) -> str:
    """GBNF for a JSON schema; ``where`` names the field in the error."""
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise InvalidRequest(f"{where}: the schema nests too deeply") from None
    except Exception as exc:  # the converter asserts / raises on what it does not support
        raise InvalidRequest(
            f"{where}: cannot turn the schema into a grammar ({type(exc).__name__}: {exc})"
        ) from None
    return gbnf.replace(_LOOSE_CHAR, _JSON_CHAR)


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """A JSON schema of exactly one call of one of ``tools``."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def forced_tools(request: Request) -> list[Tool]:
    """The tools the model must call one of (empty: no call is forced)."""
    if not request.tools:
        return []
    name = tool_choice_name(request.tool_choice)
    if name is not None:
        return [t for t in request.tools if t.function.name == name]
    return list(request.tools) if request.tool_choice == "required" else []


def request_grammar(request: Request) -> str | None:
    """The grammar the request's output must follow, or None for free text."""
    forced = forced_tools(request)
    if forced:
        return schema_grammar(tool_call_schema(forced), "tools")
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_GBNF
    assert fmt.json_schema is not None  # ResponseFormat checks it
    return schema_grammar(fmt.json_schema.schema, "response_format.json_schema.schema")
