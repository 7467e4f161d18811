"""Frame checks and the few bodies the broker writes itself. Pure: no sockets here.

Stream messages from workers are forwarded as received; everything in this module is for
the slow path (control messages, bad input, answers the broker makes on its own).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import PROTOCOL_VERSION, VERSION_FRAME, encode, version_of
from tokenhive.schemas.messages import Error, Rejected, Reregister

REREGISTER = encode(Reregister())


def version_problem(frame: bytes) -> tuple[str, str] | None:
    """None when ``frame`` is our version frame, else (status counter, message for the peer)."""
    if frame == VERSION_FRAME:
        return None
    version = version_of(frame)
    if version is None:
        return "bad_frames", (
            f"not a tokenhive message: the first frame must be the version frame {VERSION_FRAME!r}"
        )
    return "wrong_version", (
        f"protocol version mismatch: broker speaks v{PROTOCOL_VERSION}, message is v{version}"
    )


def error_body(request_id: str, code: ErrorCode, message: str, **fields: Any) -> bytes:
    return encode(Error.make(request_id, code, message, **fields))


def rejected_body(code: ErrorCode, message: str) -> bytes:
    return encode(Rejected(code=code, message=message))


def guess_request_id(body: bytes) -> str:
    """The request id inside a client message that failed to decode, if one can be found,
    so the error reaches the caller that is waiting for that id; "" otherwise."""
    try:
        obj = msgspec.msgpack.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return ""
    if not isinstance(obj, dict):
        return ""
    request = obj.get("request")
    if isinstance(request, dict) and isinstance(request.get("id"), str):
        return request["id"]
    if obj.get("type") == "cancel" and isinstance(obj.get("id"), str):
        return obj["id"]
    return ""


def decode_problem(exc: msgspec.DecodeError, body: bytes) -> tuple[str, str]:
    """(message, request id) for a client message that failed to decode: answered with
    ``invalid_request`` and counted as ``bad_frames``.

    A ``ValidationError`` is well-formed msgpack that breaks a rule of the message types (a
    sampling range, a priority level, a missing field); msgspec's text names the field
    (``... - at `$.request.sampling.top_p```). Anything else is not msgpack at all."""
    what = "invalid" if isinstance(exc, msgspec.ValidationError) else "undecodable"
    return f"{what} client message: {short(exc)}", guess_request_id(body)


def short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."
