"""Tool calls read back out of a local model's text.

Two modes, picked by the request:

* **forced** (``tool_choice`` "required" or a named function): the output was generated under
  the grammar of ``grammar.tool_call_schema``, so it *is* one JSON call
  ``{"name": ..., "arguments": {...}}`` of an offered function. Its text is held back and
  becomes one tool call; the answer finishes with ``tool_calls``. Only an output cut short
  (``max_tokens``) does not parse: it goes out as text with finish ``length``.
* **auto** (tools offered, the model decides), best effort: text that could still be the
  start of a call (it begins, after blanks, with ``{``, ``[``, a code fence or a known call
  marker) is held back; as soon as it cannot be, everything streams as usual. At the end,
  held text is searched for calls in the shapes models are trained on: the whole text is a
  JSON call (or a list of them; ``parameters`` is accepted for ``arguments``), possibly in a
  ```` ```json ```` fence or after ``[TOOL_CALLS]`` / ``<|python_tag|>``, or one or more
  ``<tool_call>{...}</tool_call>`` blocks (Hermes / Qwen). Only calls to offered functions
  count; anything else goes out as the text it was.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from tokenhive.schemas.tools import TOOL_CALLS, FunctionCall, ToolCall, as_deltas
from tokenhive.workers.backend import Delta, Done

_MARKERS = ("<tool_call>", "```", "[TOOL_CALLS]", "<|python_tag|>")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def could_be_call(text: str) -> bool:
    """Could ``text`` (the output so far) still turn out to be a tool call?"""
    head = text.lstrip()
    if not head:
        return True
    if head[0] in "{[":
        return True
    if head.startswith("```") and "\n" in head:  # a fenced block: only JSON may be a call
        return head[3:head.index("\n")].strip().lower() in ("", "json")
    return any(head.startswith(m) or m.startswith(head) for m in _MARKERS)


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if name not in names or not isinstance(args, dict):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(
        name=name, arguments=json.dumps(args, ensure_ascii=False)))


def _calls_in_json(text: str, names: set[str]) -> list[ToolCall]:
    try:
        parsed = json.loads(text)
    except ValueError:
        return []
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [_as_call(item, names) for item in items]
    return [c for c in calls if c is not None] if all(calls) and calls else []


def parse_calls(text: str, names: set[str]) -> list[ToolCall]:
    """The tool calls ``text`` consists of (see the module doc); [] when it is not calls."""
    body = text.strip()
    for prefix in ("[TOOL_CALLS]", "<|python_tag|>"):
        body = body.removeprefix(prefix).strip()
    if body.startswith("<tool_call>"):
        found = [_calls_in_json(block, names) for block in _TAGGED.findall(body)]
        return [c for group in found for c in group] if found and all(found) else []
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    return _calls_in_json(body, names)


class ToolOutputFilter:
    """Sits between the engine's events and the backend's caller (see the module doc)."""

    def __init__(self, forced: bool, names: set[str]) -> None:
        self._forced = forced
        self._names = names
        self._held: list[str] = []
        self._held_tokens = 0
        self._holding = True

    def feed(self, delta: Delta) -> Delta | None:
        """What to pass on now for ``delta`` (None: held back)."""
        if not self._holding:
            return delta
        self._held.append(delta.text)
        self._held_tokens += delta.tokens
        if self._forced or could_be_call("".join(self._held)):
            return None
        self._holding = False  # plain text after all: release it and stream from here on
        return self._release()

    def finish(self, done: Done) -> list[Delta | Done]:
        if not self._holding:
            return [done]
        text = "".join(self._held)
        calls = parse_calls(text, self._names) if done.finish_reason == "stop" else []
        if calls:
            return [Delta("", self._held_tokens, as_deltas(calls)),
                    Done(TOOL_CALLS, done.usage)]
        out: list[Delta | Done] = [self._release()] if text or self._held_tokens else []
        return [*out, done]

    def _release(self) -> Delta:
        delta = Delta("".join(self._held), self._held_tokens)
        self._held.clear()
        self._held_tokens = 0
        return delta
