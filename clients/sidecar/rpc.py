"""llmkit's JSON-RPC 2.0 over stdio, as its ``local`` provider speaks it (``local/protocol.go``).

One message per line. The peer sends requests (``init``, ``complete``, ``shutdown``: with an
``id``, answered by exactly one response with that ``id``) and one notification,
``stream.start`` (no ``id``, so never answered by a response): its answer is a run of
``stream.chunk`` notifications ended by one ``stream.done`` or ``stream.error``. A message
the sidecar cannot read is answered by an error response with ``"id": null`` (JSON-RPC 2.0,
section 5), which llmkit's reader skips like a notification.

The shapes below are llmkit's Go structs field for field (names, ``omitempty``), so what we
write decodes into them without loss; the error codes are its constants.
"""

from __future__ import annotations

from typing import Any

import msgspec

JSONRPC = "2.0"

# Standard JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# llmkit's application codes (-32000 to -32099).
BACKEND_ERROR = -32000
MODEL_NOT_FOUND = -32001
STREAM_ERROR = -32002
CONNECTION_ERROR = -32003  # the only code llmkit retries

#: a request id as JSON-RPC allows it (llmkit sends int64); None is JSON null
RequestId = int | str | None


class RpcError(Exception):
    """An error to answer with: ``code`` is one of the constants above."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


# -- what we write ------------------------------------------------------------------------


class ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: dict[str, Any] | None = None


class ResultResponse(msgspec.Struct):
    jsonrpc: str
    result: Any
    id: RequestId


class ErrorResponse(msgspec.Struct):
    jsonrpc: str
    error: ErrorObject
    id: RequestId


class Notification(msgspec.Struct):
    jsonrpc: str
    method: str
    params: Any


class Usage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class CompleteResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    content: str
    model: str = ""
    finish_reason: str = ""
    usage: Usage


class InitResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    ready: bool
    version: str = ""
    message: str = ""


class ShutdownResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    success: bool
    message: str = ""


class StreamChunk(msgspec.Struct):
    content: str
    done: bool


class TaggedStreamChunk(msgspec.Struct):
    """A chunk of a streamed ``complete`` request (``"stream": true`` with an id): the
    request's id rides in the params, since a notification has no id of its own. llmkit's
    decoder ignores the extra field; its own streams (``stream.start``) never get one."""

    content: str
    done: bool
    id: RequestId


class StreamDone(msgspec.Struct, kw_only=True, omit_defaults=True):
    usage: Usage
    finish_reason: str = ""
    model: str = ""


class StreamError(msgspec.Struct):
    code: int
    message: str


_encoder = msgspec.json.Encoder()


def _line(message: msgspec.Struct) -> bytes:
    out = bytearray()
    _encoder.encode_into(message, out)
    out += b"\n"  # JSON text never holds a raw newline: strings escape it
    return bytes(out)


def result_line(request_id: RequestId, result: msgspec.Struct) -> bytes:
    return _line(ResultResponse(jsonrpc=JSONRPC, result=result, id=request_id))


def error_line(request_id: RequestId, error: RpcError) -> bytes:
    body = ErrorObject(code=error.code, message=error.message, data=error.data)
    return _line(ErrorResponse(jsonrpc=JSONRPC, error=body, id=request_id))


def notification_line(method: str, params: msgspec.Struct) -> bytes:
    return _line(Notification(jsonrpc=JSONRPC, method=method, params=params))


# -- what we read -------------------------------------------------------------------------


class Incoming(msgspec.Struct, frozen=True):
    """One well-formed message: a request when ``has_id``, else a notification."""

    method: str
    params: Any
    has_id: bool
    id: RequestId = None


class BadMessage(Exception):
    """A line that is not a usable JSON-RPC message; ``id`` is the id when one was legible."""

    def __init__(self, error: RpcError, request_id: RequestId = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.id = request_id


_decoder = msgspec.json.Decoder()


def parse(line: bytes) -> Incoming:
    """One line as a message, or BadMessage with the error JSON-RPC names for it."""
    try:
        obj = _decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise BadMessage(RpcError(PARSE_ERROR, f"parse error: {exc}")) from None
    if isinstance(obj, list):
        raise BadMessage(RpcError(INVALID_REQUEST, "batch requests (JSON arrays) are not "
                                                   "supported: send one message per line"))
    if not isinstance(obj, dict):
        raise BadMessage(RpcError(INVALID_REQUEST, "a message must be a JSON object"))
    has_id = "id" in obj
    request_id = obj.get("id")
    if has_id and (isinstance(request_id, bool)
                   or not isinstance(request_id, int | str | None)):
        raise BadMessage(RpcError(INVALID_REQUEST, "id must be a number, a string or null"))
    if obj.get("jsonrpc") != JSONRPC:
        raise BadMessage(RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"'), request_id)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise BadMessage(RpcError(INVALID_REQUEST, "method must be a non-empty string"),
                         request_id)
    # params are checked by the method that reads them: a bad stream.start is answered
    # with stream.error, which only its handler knows to send
    return Incoming(method=method, params=obj.get("params"), has_id=has_id, id=request_id)
