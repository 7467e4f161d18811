"""tokenhive: a high-throughput LLM generation pool.

The public surface, importable from the top::

    from tokenhive import AsyncClient, Client, Pool, PoolConfig, TokenHiveError

Names resolve lazily (PEP 562), so ``import tokenhive.schemas`` in a worker does not pull in the
client stack, and ``import tokenhive`` alone costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenhive.clients import (
        NO_RETRY,
        AsyncClient,
        Client,
        Result,
        RetryPolicy,
        Stream,
        SyncStream,
    )
    from tokenhive.clients.pool.public import Pool
    from tokenhive.schemas.config import PoolConfig
    from tokenhive.schemas.errors import (
        BackendError,
        BackendTimeout,
        BackendUnavailable,
        BrokerUnavailable,
        BudgetExceeded,
        Cancelled,
        ContextTooLong,
        DeadlineExceeded,
        ErrorCode,
        InternalError,
        InvalidRequest,
        ModelFailed,
        ModelLoadFailed,
        Overloaded,
        ProtocolMismatch,
        RateLimited,
        TokenHiveError,
        UnknownModel,
        WorkerLost,
    )

_CLIENTS = ("AsyncClient", "Client", "Result", "RetryPolicy", "NO_RETRY", "Stream", "SyncStream")
_ERRORS = (
    "TokenHiveError", "ErrorCode", "InvalidRequest", "ContextTooLong", "UnknownModel",
    "ProtocolMismatch", "Overloaded", "RateLimited", "DeadlineExceeded", "Cancelled",
    "WorkerLost", "BackendError", "BackendTimeout", "BackendUnavailable", "ModelLoadFailed",
    "ModelFailed", "BrokerUnavailable", "InternalError", "BudgetExceeded",
)
_WHERE = {**dict.fromkeys(_CLIENTS, "tokenhive.clients"),
          **dict.fromkeys(_ERRORS, "tokenhive.schemas.errors"),
          "Pool": "tokenhive.clients.pool.public", "PoolConfig": "tokenhive.schemas.config"}

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BrokerUnavailable",
    "BudgetExceeded",
    "Cancelled",
    "Client",
    "ContextTooLong",
    "DeadlineExceeded",
    "ErrorCode",
    "InternalError",
    "InvalidRequest",
    "ModelFailed",
    "ModelLoadFailed",
    "Overloaded",
    "Pool",
    "PoolConfig",
    "ProtocolMismatch",
    "RateLimited",
    "Result",
    "RetryPolicy",
    "Stream",
    "SyncStream",
    "TokenHiveError",
    "UnknownModel",
    "WorkerLost",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenhive' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
