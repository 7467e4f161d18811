"""Whether a submitted request is accepted, and the typed error when it is not.

A refused request changes nothing in the broker except a counter; the client gets exactly
one Error for it. Checks run cheapest and most specific first.

Value ranges (sampling, priority) were already checked by the decode (msgspec constraints on
the message types); this module checks what depends on config and broker state: the size
caps of ``BrokerConfig.limits``, known models, deadlines and queue room.
"""

from __future__ import annotations

from typing import NamedTuple

from tokenhive.broker.registry import WorkerRegistry
from tokenhive.schemas.config import Limits
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.messages import Error, Kind, Request
from tokenhive.schemas.tools import schema_bytes, tools_problem


class Refusal(NamedTuple):
    counter: str  # status counter to bump
    error: Error


def deadline_of(request: Request, now: float, wall_now: float) -> float | None:
    """Monotonic deadline from ``timeout`` (relative) and/or ``deadline`` (wall clock)."""
    deadline: float | None = None
    if request.timeout is not None:
        deadline = now + request.timeout
    if request.deadline is not None:
        from_wall = now + (request.deadline - wall_now)
        deadline = from_wall if deadline is None else min(deadline, from_wall)
    return deadline


DEFAULT_LIMITS = Limits()


def size_problem(request: Request, limits: Limits) -> str | None:
    """The first size cap ``request`` exceeds, naming the field and the limit; None if none.
    Counts are checked before lengths, so the work here is bounded by the caps."""
    stop = request.sampling.stop
    if len(stop) > limits.max_stop:
        return (f"sampling.stop has {len(stop)} sequences, more than "
                f"limits.max_stop={limits.max_stop}")
    for i, seq in enumerate(stop):
        if len(seq) > limits.max_stop_chars:
            return (f"sampling.stop[{i}] is {len(seq)} characters, more than "
                    f"limits.max_stop_chars={limits.max_stop_chars}")
    messages = request.messages
    if len(messages) > limits.max_messages:
        return (f"messages has {len(messages)} items, more than "
                f"limits.max_messages={limits.max_messages}")
    if messages:
        chars = sum(len(m.content) for m in messages)
        if chars > limits.max_prompt_chars:
            return (f"messages hold {chars} characters of content, more than "
                    f"limits.max_prompt_chars={limits.max_prompt_chars}")
    if (tools := tool_size_problem(request, limits)) is not None:
        return tools
    if request.prompt is not None and len(request.prompt) > limits.max_prompt_chars:
        return (f"prompt is {len(request.prompt)} characters, more than "
                f"limits.max_prompt_chars={limits.max_prompt_chars}")
    inputs = request.input
    if len(inputs) > limits.max_inputs:
        return f"input has {len(inputs)} items, more than limits.max_inputs={limits.max_inputs}"
    if inputs:
        chars = sum(len(x) for x in inputs)
        if chars > limits.max_input_chars:
            return (f"input holds {chars} characters in all, more than "
                    f"limits.max_input_chars={limits.max_input_chars}")
    return None


def tool_size_problem(request: Request, limits: Limits) -> str | None:
    """Tools, tool_choice, response_format and the calls in the messages: count and bytes
    capped, then the cross-field rules (a named tool_choice names an offered tool)."""
    if (request.tools or request.tool_choice is not None) and request.kind is not Kind.CHAT:
        return "tools and tool_choice are for chat requests"
    if len(request.tools) > limits.max_tools:
        return (f"tools has {len(request.tools)} items, more than "
                f"limits.max_tools={limits.max_tools}")
    if request.tools or request.response_format is not None:
        size = schema_bytes(request.tools, request.response_format)
        if size > limits.max_tool_schema_bytes:
            return (f"tools and response_format schema are {size} bytes of JSON, more than "
                    f"limits.max_tool_schema_bytes={limits.max_tool_schema_bytes}")
    calls = [c for m in request.messages for c in m.tool_calls or ()]
    if calls and (n := sum(len(c.function.arguments) for c in calls)) > limits.max_prompt_chars:
        return (f"messages hold {n} characters of tool call arguments, more than "
                f"limits.max_prompt_chars={limits.max_prompt_chars}")
    return tools_problem(request.tools, request.tool_choice)


def refusal(
    request: Request,
    *,
    duplicate: bool,
    registry: WorkerRegistry,
    queue_full: bool,
    deadline: float | None,
    now: float,
    retry_after: float,
    limits: Limits = DEFAULT_LIMITS,
) -> Refusal | None:
    rid = request.id

    def invalid(message: str) -> Refusal:
        return Refusal("rejected_invalid", Error.make(rid, ErrorCode.INVALID_REQUEST, message))

    if not rid:
        return invalid("request id must not be empty")
    if duplicate:
        return invalid(f"duplicate request id {rid!r}: a request with this id is still pending")
    if not request.model:
        return invalid("request model must not be empty")
    if request.timeout is not None and not request.timeout > 0:
        return invalid(f"timeout must be > 0 seconds, got {request.timeout}")
    if (too_big := size_problem(request, limits)) is not None:
        return invalid(too_big)
    if deadline is not None and deadline <= now:
        return Refusal(
            "rejected_deadline",
            Error.make(rid, ErrorCode.DEADLINE_EXCEEDED, "deadline already passed on arrival"),
        )
    if not registry.known_model(request.model):
        known = ", ".join(sorted(registry.models_seen)) or "none"
        return Refusal("unknown_model", Error.make(
            rid, ErrorCode.UNKNOWN_MODEL,
            f"no worker serves model {request.model!r} (known models: {known})",
        ))
    if registry.of_model(request.model) and not registry.serves_kind(request.model, request.kind):
        return invalid(f"model {request.model!r} does not serve {request.kind.value} requests")
    if queue_full:
        return Refusal("overloaded", Error.make(
            rid, ErrorCode.OVERLOADED, f"queue for model {request.model!r} is full",
            retry_after=retry_after,
        ))
    return None
