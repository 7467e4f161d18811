"""Tool calling and structured output on the wire, in OpenAI's shape.

A request may offer ``tools`` (functions with a JSON-schema ``parameters``), say how the model
may use them (``tool_choice``: "none" | "auto" | "required" | a named function) and ask for
JSON output (``response_format``: ``json_object`` or a ``json_schema``). Chat messages carry an
assistant's ``tool_calls`` and the ``tool`` results that answer them (``tool_call_id``).

Answers carry tool calls the way OpenAI streams them: a Chunk holds ``ToolCallDelta`` items
(the first for a call names its ``id`` and function ``name``; later ones append to its
``arguments`` text), and ``ToolCallAssembler`` folds them back into whole ``ToolCall`` values
(the client's ``Result.tool_calls``). A request that ended in tool calls finishes with
``finish_reason = "tool_calls"``.

Shapes and ranges are checked by msgspec on every decode (and by ``validated`` for values built
in Python); what depends on the whole request (a named tool_choice must name an offered tool)
is ``tools_problem``; how many tools and how many schema bytes are allowed is the broker's
configured limits (``Limits.max_tools``, ``Limits.max_tool_schema_bytes``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

#: OpenAI's rule for function names (and the response schema's name)
FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
TOOL_CALLS = "tool_calls"  # the finish reason of an answer that is tool calls


class FunctionDef(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A function the model may call; ``parameters`` is a JSON schema of its arguments."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True):  # "type" always written: APIs need it
    function: FunctionDef
    type: Literal["function"] = "function"


class ToolChoiceFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    """``{"type": "function", "function": {"name": ...}}``: the model must call this one."""

    function: ToolChoiceFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str = ""  # JSON text of the arguments object, as OpenAI sends it


class ToolCall(msgspec.Struct):
    """One call the model made (in an answer), or made earlier (in an assistant message)."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"

    def parsed_arguments(self) -> Any:
        """The arguments decoded from JSON (raises msgspec.DecodeError if they are not)."""
        return msgspec.json.decode(self.function.arguments or "{}")


class ToolCallDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """A piece of the ``index``-th tool call of an answer (OpenAI's streamed shape)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""  # appended to what earlier deltas of this index carried


class JSONSchemaFormat(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    name: FunctionName
    schema: dict[str, Any] = msgspec.field(default_factory=dict)
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def __post_init__(self) -> None:  # msgspec runs it on decode too: a ValidationError there
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format of type {self.type} takes no json_schema")


def tool_choice_name(choice: ToolChoice | None) -> str | None:
    """The function a named tool_choice forces, else None."""
    return choice.function.name if isinstance(choice, NamedToolChoice) else None


def tools_problem(tools: list[Tool], choice: ToolChoice | None) -> str | None:
    """What is wrong with this tools/tool_choice pair, or None (field names as OpenAI's)."""
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        return f"tools: the function name {dup!r} is offered twice"
    if choice == "required" and not tools:
        return "tool_choice is 'required' but no tools are offered"
    forced = tool_choice_name(choice)
    if forced is not None and forced not in names:
        return f"tool_choice names {forced!r}, which is not among the offered tools {names}"
    return None


def schema_bytes(tools: list[Tool], response_format: ResponseFormat | None) -> int:
    """Bytes of the tool definitions and the response schema as JSON (what the size cap
    counts: every one is compiled or sent upstream)."""
    n = len(msgspec.json.encode(tools)) if tools else 0
    if response_format is not None and response_format.json_schema is not None:
        n += len(msgspec.json.encode(response_format.json_schema.schema))
    return n


class ToolCallAssembler:
    """Folds streamed ``ToolCallDelta`` items into whole ``ToolCall`` values, by index."""

    def __init__(self) -> None:
        self._ids: dict[int, str] = {}
        self._names: dict[int, str] = {}
        self._args: dict[int, list[str]] = {}

    def add(self, deltas: list[ToolCallDelta]) -> None:
        for d in deltas:
            if d.id:
                self._ids[d.index] = d.id
            if d.name:  # OpenAI names a call once; some servers repeat it in every delta
                self._names.setdefault(d.index, d.name)
            self._args.setdefault(d.index, []).append(d.arguments)

    def __bool__(self) -> bool:
        return bool(self._args)

    def calls(self) -> list[ToolCall]:
        return [
            ToolCall(
                id=self._ids.get(i, f"call_{i}"),
                function=FunctionCall(name=self._names.get(i, ""), arguments="".join(parts)),
            )
            for i, parts in sorted(self._args.items())
        ]


def as_deltas(calls: list[ToolCall]) -> list[ToolCallDelta]:
    """Whole calls as one delta each (a non-streamed answer, or a backend that got them
    whole)."""
    return [
        ToolCallDelta(index=i, id=c.id, name=c.function.name, arguments=c.function.arguments)
        for i, c in enumerate(calls)
    ]
