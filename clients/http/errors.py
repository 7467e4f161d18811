"""OpenAI's error body, and the one table from tokenhive's error codes to HTTP statuses.

Every error this server answers has OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "code": "...", "param": null}}

so the official clients raise their usual classes (404 NotFoundError, 400 BadRequestError,
429 RateLimitError, ...). ``openai_error`` builds one; ``from_exception`` turns any
TokenHiveError into one through ``STATUS_OF``. Routes of other modules (the Files/Batches API)
use these two so every error looks the same.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import msgspec
from starlette.responses import Response

from tokenhive.schemas.errors import ErrorCode, InvalidRequest, TokenHiveError

INVALID = "invalid_request_error"
AUTH = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
NOT_FOUND = "not_found_error"
QUOTA = "insufficient_quota"


class HttpError(NamedTuple):
    status: int
    type: str
    code: str


#: ErrorCode -> (HTTP status, OpenAI error type, OpenAI error code). Written once; a test
#: checks that every ErrorCode has a row.
STATUS_OF: dict[ErrorCode, HttpError] = {
    ErrorCode.INVALID_REQUEST: HttpError(400, INVALID, "invalid_request"),
    ErrorCode.CONTEXT_TOO_LONG: HttpError(400, INVALID, "context_length_exceeded"),
    ErrorCode.UNKNOWN_MODEL: HttpError(404, INVALID, "model_not_found"),
    # our broker speaks another protocol version: a deployment fault behind this server
    ErrorCode.PROTOCOL_VERSION: HttpError(502, SERVER, "protocol_version"),
    # the model's queue is full: capacity, not the caller's quota -> 503 with Retry-After
    ErrorCode.OVERLOADED: HttpError(503, SERVER, "overloaded"),
    # an upstream API rate-limits the pool: the caller should slow down -> 429
    ErrorCode.RATE_LIMITED: HttpError(429, RATE_LIMIT, "rate_limit_exceeded"),
    ErrorCode.DEADLINE_EXCEEDED: HttpError(504, SERVER, "timeout"),
    ErrorCode.CANCELLED: HttpError(503, SERVER, "cancelled"),
    ErrorCode.WORKER_LOST: HttpError(502, SERVER, "worker_lost"),
    ErrorCode.BACKEND_ERROR: HttpError(502, SERVER, "backend_error"),
    ErrorCode.BACKEND_TIMEOUT: HttpError(504, SERVER, "backend_timeout"),
    ErrorCode.BACKEND_UNAVAILABLE: HttpError(503, SERVER, "backend_unavailable"),
    ErrorCode.MODEL_LOAD_FAILED: HttpError(503, SERVER, "model_load_failed"),
    ErrorCode.MODEL_FAILED: HttpError(503, SERVER, "model_failed"),
    ErrorCode.BROKER_UNAVAILABLE: HttpError(503, SERVER, "broker_unavailable"),
    ErrorCode.INTERNAL: HttpError(500, SERVER, "internal_error"),
    # a profile's token or USD budget is spent for its window: OpenAI's "quota" answer
    ErrorCode.BUDGET_EXCEEDED: HttpError(429, QUOTA, "budget_exceeded"),
}

#: statuses that tell a client to come back later; they always carry Retry-After
_RETRY_LATER = frozenset({429, 503})
DEFAULT_RETRY_AFTER = 1.0


class BadField(InvalidRequest):
    """An invalid request body field: a 400 whose ``param`` names it (``messages[0].role``)."""

    def __init__(self, param: str | None, message: str, *, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.http_code = code


class HttpProblem(Exception):
    """A failure at the HTTP level (bad auth, body too large, unknown route) that has no
    ErrorCode of its own; rendered by ``openai_error`` with these exact fields."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(message: str, *, type: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def openai_error(status: int, message: str, *, type: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """An error response in OpenAI's shape."""
    content = msgspec.json.encode(error_body(message, type=type, code=code, param=param))
    return Response(content, status_code=status, media_type="application/json",
                    headers=headers)


def http_error_of(exc: TokenHiveError) -> HttpError:
    return STATUS_OF.get(exc.code, STATUS_OF[ErrorCode.INTERNAL])


def from_exception(exc: TokenHiveError) -> Response:
    """The response for a request that failed with ``exc``."""
    row = http_error_of(exc)
    headers: dict[str, str] = {}
    if row.status in _RETRY_LATER or exc.retry_after is not None:
        seconds = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    if isinstance(exc, BadField):
        return openai_error(row.status, exc.message, type=row.type, code=exc.http_code,
                            param=exc.param, headers=headers)
    return openai_error(row.status, exc.message, type=row.type, code=row.code, headers=headers)


def stream_error_event(exc: TokenHiveError) -> bytes:
    """An SSE event carrying the error, for a failure after the 200 and the first chunk were
    sent (the official clients raise it as an APIError)."""
    row = http_error_of(exc)
    body = error_body(exc.message, type=row.type, code=row.code)
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def from_problem(problem: HttpProblem) -> Response:
    return openai_error(problem.status, problem.message, type=problem.type, code=problem.code,
                        param=problem.param, headers=problem.headers)
