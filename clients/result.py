"""What a finished request gives back to the caller."""

from __future__ import annotations

import msgspec

from tokenhive.schemas.messages import Timings, Usage
from tokenhive.schemas.tools import ToolCall


class Result(msgspec.Struct, kw_only=True):
    """The answer to one request, after every chunk and the Final have arrived.

    ``id`` is the request id that produced the answer (a retry gets a suffixed id, see
    ``Call``); ``chunks`` counts the Chunk messages received; ``attempts`` counts submissions.
    """

    id: str
    text: str = ""
    finish_reason: str = ""
    usage: Usage = msgspec.field(default_factory=Usage)
    timings: Timings = msgspec.field(default_factory=Timings)
    worker: str = ""
    chunks: int = 0
    embeddings: list[list[float]] | None = None
    attempts: int = 1
    model: str = ""  # the backing model that served (a group member or a fallback)
    tried: list[str] = msgspec.field(default_factory=list)  # models that failed first
    # The model's tool calls (finish_reason "tool_calls"); arguments are JSON text, see
    # ToolCall.parsed_arguments(). None when it called none.
    tool_calls: list[ToolCall] | None = None
