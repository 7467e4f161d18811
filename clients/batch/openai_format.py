"""The OpenAI Batch API line formats: request lines in, response lines out.

Input line::

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output line (success, then failure)::

    {"id": "batch_req_...", "custom_id": "a", "response": {"status_code": 200,
     "request_id": "...", "body": {<chat.completion | text_completion | embedding list>}},
     "error": null}
    {"id": "batch_req_...", "custom_id": "a", "response": null,
     "error": {"code": "invalid_request", "message": "..."}}

Body fields that would change the meaning of the answer and that tokenhive cannot honour
(tools, response_format, n > 1, ...) are refused with ``invalid_request`` rather than
silently ignored; harmless ones (user, metadata, stream, ...) are ignored.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

import msgspec

from tokenhive.clients.request_builder import ROLES, new_request_id
from tokenhive.clients.result import Result
from tokenhive.schemas.errors import InvalidRequest, TokenHiveError
from tokenhive.schemas.messages import Kind, Message, Priority, Request, Sampling

URL_KIND = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETION,
    "/v1/embeddings": Kind.EMBEDDING,
}
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format",
               "logit_bias", "top_logprobs", "suffix", "echo", "best_of", "dimensions",
               "audio", "modalities", "prediction")


class BatchItem(msgspec.Struct):
    custom_id: str
    url: str
    request: Request
    encoding_format: str = "float"  # embeddings: float | base64


def custom_id_of(line: object) -> str | None:
    if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
        return str(line["custom_id"])
    return None


def parse_item(line: object, model_for: Any, timeout: float | None) -> BatchItem:
    """A decoded input line -> BatchItem. ``model_for(body_model)`` picks the model to ask
    for. Raises InvalidRequest naming what is wrong."""
    if not isinstance(line, dict):
        raise InvalidRequest("a batch line must be a JSON object")
    custom_id = custom_id_of(line)
    if not custom_id:
        raise InvalidRequest("missing or non-string custom_id")
    if line.get("method", "POST") != "POST":
        raise InvalidRequest(f"method must be POST, got {line.get('method')!r}")
    url, body = line.get("url"), line.get("body")
    kind = URL_KIND.get(url) if isinstance(url, str) else None
    if kind is None:
        raise InvalidRequest(f"url must be one of {sorted(URL_KIND)}, got {url!r}")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False):
            raise InvalidRequest(f"body.{key} is not supported by tokenhive")
    if body.get("n", 1) != 1:
        raise InvalidRequest("body.n: only n = 1 is supported")
    body_model = body.get("model")
    model = model_for(body_model if isinstance(body_model, str) else None)
    if not model:
        raise InvalidRequest("body.model is missing and no default model is known")
    request = Request(id=new_request_id(), model=model, kind=kind, priority=Priority.BATCH,
                      timeout=timeout, stream=False)
    fmt = "float"
    if kind is Kind.CHAT:
        request.messages = _messages(body.get("messages"))
        request.sampling = _sampling(body)
    elif kind is Kind.COMPLETION:
        request.prompt = _prompt(body.get("prompt"))
        request.sampling = _sampling(body)
    else:
        request.input = _inputs(body.get("input"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise InvalidRequest(f"body.encoding_format must be float or base64, got {fmt!r}")
    return BatchItem(custom_id=custom_id, url=str(url), request=request, encoding_format=fmt)


def _messages(raw: object) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRequest(f"body.messages[{i}] must be an object")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"body.messages[{i}].role {m.get('role')!r} is not supported")
        out.append(Message(role=str(role), content=_content(m.get("content"), i)))
    return out


def _content(raw: object, i: int) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(p, dict) for p in raw):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in raw):
            raise InvalidRequest(f"body.messages[{i}].content: only text parts are supported")
        return "".join(p["text"] for p in raw)
    raise InvalidRequest(f"body.messages[{i}].content must be a string or a list of text parts")


def _prompt(raw: object) -> str:
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, str):
        raise InvalidRequest("body.prompt must be a string (or a list of exactly one string)")
    return raw


def _inputs(raw: object) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise InvalidRequest("body.input must be a string or a non-empty list of strings")
    return list(items)


def _sampling(body: dict[str, Any]) -> Sampling:
    stop = body.get("stop")
    fields = {
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
        "presence_penalty": body.get("presence_penalty"),
        "frequency_penalty": body.get("frequency_penalty"),
        "stop": [stop] if isinstance(stop, str) else (stop or []),
    }
    try:
        return msgspec.convert(fields, Sampling)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"body: {exc}") from None


def success_line(item: BatchItem, result: Result) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": result.id,
                     "body": response_body(item, result)},
        "error": None,
    }


def error_line(custom_id: str | None, exc: TokenHiveError) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
        "error": {"code": exc.code.value, "message": exc.message},
    }


def response_body(item: BatchItem, result: Result) -> dict[str, Any]:
    model, created, u = item.request.model, int(time.time()), result.usage
    usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
             "total_tokens": u.total_tokens}
    kind = item.request.kind
    if kind is Kind.CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": result.finish_reason}
        return {"id": f"chatcmpl-{result.id}", "object": "chat.completion", "created": created,
                "model": model, "choices": [choice], "usage": usage}
    if kind is Kind.COMPLETION:
        choice = {"index": 0, "text": result.text, "logprobs": None,
                  "finish_reason": result.finish_reason}
        return {"id": f"cmpl-{result.id}", "object": "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": usage}
    vectors = result.embeddings or []
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, item.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens}}


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: little-endian float32, base64
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
