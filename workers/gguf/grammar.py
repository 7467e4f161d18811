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

The converter silently skips some JSON-schema keywords (number ranges, ``multipleOf``,
``uniqueItems``, most string formats, ``not``, conditionals, ...): a grammar built without
them would let through output that does not validate. A schema using one is refused,
naming the keyword and where it is, so that "the output validates" holds whenever a schema
is accepted. Annotations (title, description, default, examples, ...) are fine.
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
# The converter allows one optional space between tokens; llama.cpp's C++ converter also
# allows one or two line breaks and a bounded indent (this is its rule), which is how models
# like to lay JSON out: far fewer of their picks are refused, and a run of whitespace still
# cannot go on forever.
_TIGHT_SPACE = 'space ::= " "?'
_LAID_OUT_SPACE = 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}'


# What the converter enforces, and what only annotates; any other keyword is refused.
_ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "pattern", "minLength", "maxLength", "format",
})
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "strict",
})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def unenforced(schema: Any, path: str = "$") -> list[str]:
    """The keywords of ``schema`` (and its subschemas) that the grammar would not enforce,
    each as ``keyword at path``."""
    if not isinstance(schema, dict):
        return []
    found = [f"{k} at {path}" for k in schema if k not in _ENFORCED and k not in _ANNOTATIONS]
    fmt = schema.get("format")
    if fmt is not None and fmt not in _FORMATS:
        found.append(f"format {fmt!r} at {path}")
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            found += unenforced(sub, f"{path}.{key}.{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or ()):
            found += unenforced(sub, f"{path}.{key}[{i}]")
    for key in ("items", "additionalProperties"):
        found += unenforced(schema.get(key), f"{path}.{key}")
    return found


def schema_grammar(schema: dict[str, Any], where: str) -> str:
    """GBNF for a JSON schema; ``where`` names the field in the error."""
    skipped = unenforced(schema)
    if skipped:
        raise InvalidRequest(
            f"{where}: the output grammar cannot enforce {', '.join(skipped[:5])}"
            + (f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else "")
            + "; drop them or express them with enum / pattern / maxLength"
        )
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise InvalidRequest(f"{where}: the schema nests too deeply") from None
    except Exception as exc:  # the converter asserts / raises on what it does not support
        raise InvalidRequest(
            f"{where}: cannot turn the schema into a grammar ({type(exc).__name__}: {exc})"
        ) from None
    return gbnf.replace(_LOOSE_CHAR, _JSON_CHAR).replace(_TIGHT_SPACE, _LAID_OUT_SPACE)


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
