"""The params of ``init`` and ``complete``/``stream.start`` (llmkit's InitParams and
CompleteParams), what they mean for the pool, and how pool errors read as JSON-RPC errors."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from tokenhive.clients.request_builder import RequestOptions
from tokenhive.clients.result import Result
from tokenhive.clients.sidecar.rpc import (
    BACKEND_ERROR,
    CONNECTION_ERROR,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MODEL_NOT_FOUND,
    CompleteResult,
    RpcError,
    Usage,
)
from tokenhive.schemas.errors import ErrorCode, TokenHiveError

T = TypeVar("T")

#: the backends llmkit's Config.Validate accepts; we serve all of them from the pool
LLMKIT_BACKENDS = ("ollama", "llama.cpp", "vllm", "transformers")

#: ``options`` keys of a complete request that mean something to the pool
SAMPLING_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "top_p": (int, float), "top_k": int, "min_p": (int, float),
    "repeat_penalty": (int, float), "presence_penalty": (int, float),
    "frequency_penalty": (int, float), "seed": int, "stop": (str, list),
    "timeout": (int, float), "priority": int,
}


class InitParams(msgspec.Struct, forbid_unknown_fields=True):
    backend: str
    model: str
    host: str = ""
    mcp_servers: dict[str, Any] | None = None
    options: dict[str, Any] | None = None


class MessageParam(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str
    name: str = ""


class CompleteParams(msgspec.Struct, forbid_unknown_fields=True):
    messages: list[MessageParam] | None = None
    model: str = ""
    system_prompt: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    stream: bool = False
    options: dict[str, Any] | None = None


def decode_params(params: Any, kind: type[T], method: str) -> T:
    """``params`` as ``kind``; RpcError(-32602) naming the field otherwise."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, f"{method}: params must be an object")
    try:
        return msgspec.convert(params, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise RpcError(INVALID_PARAMS, f"{method}: invalid params: {exc}") from None


def check_init(p: InitParams) -> None:
    if p.backend not in LLMKIT_BACKENDS:
        raise RpcError(INVALID_PARAMS, f"init: backend {p.backend!r} is not one of "
                                       f"{', '.join(LLMKIT_BACKENDS)}")
    if not p.model.strip():
        raise RpcError(INVALID_PARAMS, "init: model is required (a pool model name)")
    if p.mcp_servers:
        raise RpcError(INVALID_PARAMS, "init: mcp_servers are not supported by the tokenhive "
                                       "sidecar")


def request_of(p: CompleteParams, default_model: str) -> tuple[list[dict[str, str]],
                                                               RequestOptions]:
    """The chat messages and the client options a complete request asks for."""
    if not p.messages:
        raise RpcError(INVALID_PARAMS, "complete: messages must not be empty")
    messages = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in p.messages]
    options: RequestOptions = {"model": p.model or default_model}
    if p.system_prompt:
        options["system"] = p.system_prompt
    if p.max_tokens < 0:
        raise RpcError(INVALID_PARAMS, f"complete: max_tokens must be >= 0, got {p.max_tokens}")
    if p.max_tokens:
        options["max_tokens"] = p.max_tokens
    if p.temperature is not None:
        options["temperature"] = p.temperature
    for key, value in (p.options or {}).items():
        kind = SAMPLING_OPTIONS.get(key)
        if kind is None:
            raise RpcError(INVALID_PARAMS, f"complete: unknown option {key!r} (known: "
                                           f"{', '.join(sorted(SAMPLING_OPTIONS))})")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise RpcError(INVALID_PARAMS, f"complete: option {key!r} has the wrong type "
                                           f"({type(value).__name__})")
        options[key] = value  # type: ignore[literal-required]  # ranges: the request's rules
    return messages, options


def usage_of(result: Result) -> Usage:
    u = result.usage
    return Usage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                 total_tokens=u.total_tokens or u.prompt_tokens + u.completion_tokens)


def complete_result(result: Result, model: str) -> CompleteResult:
    return CompleteResult(content=result.text, model=model,
                          finish_reason=result.finish_reason, usage=usage_of(result))


#: pool error -> llmkit code. Connection-class failures get -32003, the one code llmkit
#: retries; everything the pool says about the request or the model keeps its own meaning.
_CODES: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: INVALID_PARAMS,
    ErrorCode.CONTEXT_TOO_LONG: INVALID_PARAMS,
    ErrorCode.UNKNOWN_MODEL: MODEL_NOT_FOUND,
    ErrorCode.MODEL_LOAD_FAILED: MODEL_NOT_FOUND,
    ErrorCode.MODEL_FAILED: MODEL_NOT_FOUND,
    ErrorCode.BROKER_UNAVAILABLE: CONNECTION_ERROR,
    ErrorCode.BACKEND_UNAVAILABLE: CONNECTION_ERROR,
    ErrorCode.WORKER_LOST: CONNECTION_ERROR,
    ErrorCode.INTERNAL: INTERNAL_ERROR,
}


def rpc_error(exc: TokenHiveError) -> RpcError:
    """A pool error as llmkit reads it; ``data`` keeps tokenhive's own code and retry flag."""
    code = _CODES.get(exc.code, BACKEND_ERROR)
    return RpcError(code, f"{exc.code.value}: {exc.message}",
                    {"tokenhive_code": exc.code.value, "retryable": exc.retryable})
