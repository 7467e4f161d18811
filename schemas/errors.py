"""One table of error codes and the exception tree that mirrors it.

Every part of tokenhive (broker, workers, backends, clients) speaks these codes on the
wire and raises these exceptions in Python. A code's retryable flag is fixed here, once.

Exception tree::

    TokenHiveError                      root of everything tokenhive raises
    ├── InvalidRequest                  invalid_request        (not retryable)
    │   └── ContextTooLong              context_too_long       (not retryable)
    ├── UnknownModel                    unknown_model          (not retryable)
    ├── ProtocolMismatch                protocol_version       (not retryable)
    ├── Overloaded                      overloaded             (retryable, retry_after)
    ├── RateLimited                     rate_limited           (retryable, retry_after)
    ├── DeadlineExceeded                deadline_exceeded      (not retryable)
    ├── Cancelled                       cancelled              (not retryable)
    ├── WorkerLost                      worker_lost            (retryable only if nothing streamed)
    ├── BackendError                    backend_error          (retryable)
    │   └── BackendTimeout              backend_timeout        (retryable)
    ├── BackendUnavailable              backend_unavailable    (retryable: connection failed)
    ├── ModelLoadFailed                 model_load_failed      (not retryable)
    │   └── ModelFailed                 model_failed           (not retryable: workers crash)
    ├── BrokerUnavailable               broker_unavailable     (retryable)
    ├── InternalError                   internal               (not retryable)
    └── BudgetExceeded                  budget_exceeded        (not retryable: a profile's budget)

``error_from_code`` turns a wire ``(code, message)`` back into the matching exception;
``TokenHiveError.code`` goes the other way.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "invalid_request"
    CONTEXT_TOO_LONG = "context_too_long"
    UNKNOWN_MODEL = "unknown_model"
    PROTOCOL_VERSION = "protocol_version"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    WORKER_LOST = "worker_lost"
    BACKEND_ERROR = "backend_error"
    BACKEND_TIMEOUT = "backend_timeout"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    MODEL_LOAD_FAILED = "model_load_failed"
    MODEL_FAILED = "model_failed"
    BROKER_UNAVAILABLE = "broker_unavailable"
    INTERNAL = "internal"
    BUDGET_EXCEEDED = "budget_exceeded"


#: code -> retryable. The single source of truth for retry decisions.
RETRYABLE: dict[ErrorCode, bool] = {
    ErrorCode.INVALID_REQUEST: False,
    ErrorCode.CONTEXT_TOO_LONG: False,
    ErrorCode.UNKNOWN_MODEL: False,
    ErrorCode.PROTOCOL_VERSION: False,
    ErrorCode.OVERLOADED: True,
    ErrorCode.RATE_LIMITED: True,
    ErrorCode.DEADLINE_EXCEEDED: False,
    ErrorCode.CANCELLED: False,
    ErrorCode.WORKER_LOST: True,
    ErrorCode.BACKEND_ERROR: True,
    ErrorCode.BACKEND_TIMEOUT: True,
    ErrorCode.BACKEND_UNAVAILABLE: True,
    ErrorCode.MODEL_LOAD_FAILED: False,
    ErrorCode.MODEL_FAILED: False,
    ErrorCode.BROKER_UNAVAILABLE: True,
    ErrorCode.INTERNAL: False,
    # A profile's token or dollar budget is spent for its window; retry_after says when the
    # window frees, but retrying blindly would only spin, so the client does not.
    ErrorCode.BUDGET_EXCEEDED: False,
}


class TokenHiveError(Exception):
    """Root of every error tokenhive raises."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        chunks_sent: int = 0,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message or self.code.value)
        self.message = message or self.code.value
        self.retry_after = retry_after
        self.chunks_sent = chunks_sent
        self.request_id = request_id
        self._retryable = retryable

    @property
    def retryable(self) -> bool:
        if self._retryable is not None:
            return self._retryable
        return RETRYABLE[self.code]


class InvalidRequest(TokenHiveError):
    code = ErrorCode.INVALID_REQUEST


class ContextTooLong(InvalidRequest):
    code = ErrorCode.CONTEXT_TOO_LONG


class UnknownModel(TokenHiveError):
    code = ErrorCode.UNKNOWN_MODEL


class ProtocolMismatch(TokenHiveError):
    code = ErrorCode.PROTOCOL_VERSION


class Overloaded(TokenHiveError):
    code = ErrorCode.OVERLOADED


class RateLimited(TokenHiveError):
    code = ErrorCode.RATE_LIMITED


class DeadlineExceeded(TokenHiveError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(TokenHiveError):
    code = ErrorCode.CANCELLED


class WorkerLost(TokenHiveError):
    code = ErrorCode.WORKER_LOST


class BackendError(TokenHiveError):
    code = ErrorCode.BACKEND_ERROR


class BackendTimeout(BackendError):
    code = ErrorCode.BACKEND_TIMEOUT


class BackendUnavailable(TokenHiveError):
    code = ErrorCode.BACKEND_UNAVAILABLE


class ModelLoadFailed(TokenHiveError):
    code = ErrorCode.MODEL_LOAD_FAILED


class ModelFailed(ModelLoadFailed):
    """Every worker of the model crashed K times in a row before serving (say, SIGILL)."""

    code = ErrorCode.MODEL_FAILED


class BrokerUnavailable(TokenHiveError):
    code = ErrorCode.BROKER_UNAVAILABLE


class InternalError(TokenHiveError):
    code = ErrorCode.INTERNAL


class BudgetExceeded(TokenHiveError):
    """A request of a profile (``[profiles.NAME]``) whose token or USD budget is spent."""

    code = ErrorCode.BUDGET_EXCEEDED


_BY_CODE: dict[ErrorCode, type[TokenHiveError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest, ContextTooLong, UnknownModel, ProtocolMismatch, Overloaded,
        RateLimited, DeadlineExceeded, Cancelled, WorkerLost, BackendError, BackendTimeout,
        BackendUnavailable, ModelLoadFailed, ModelFailed, BrokerUnavailable, InternalError,
        BudgetExceeded,
    )
}


def error_class(code: ErrorCode | str) -> type[TokenHiveError]:
    """The exception class for a wire code; unknown codes map to InternalError."""
    try:
        return _BY_CODE[ErrorCode(code)]
    except ValueError:
        return InternalError
