"""Wire protocol, config and error codes. Pure data: nothing here does I/O."""

from tokenhive.schemas.errors import ErrorCode, TokenHiveError
from tokenhive.schemas.frames import PROTOCOL_VERSION, VERSION_FRAME
from tokenhive.schemas.messages import (
    Chunk,
    Error,
    Final,
    Health,
    Kind,
    Message,
    Priority,
    Request,
    Sampling,
    Timings,
    Usage,
)

__all__ = [
    "PROTOCOL_VERSION", "VERSION_FRAME", "Chunk", "Error", "ErrorCode", "Final", "Health",
    "Kind", "Message", "Priority", "Request", "Sampling", "Timings", "TokenHiveError", "Usage",
]
