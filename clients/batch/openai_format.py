"""The OpenAI Batch API line formats: request lines in, response lines out.

Input line::

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output line (success, then failure)::

    {"id": "batch_req_...", "custom_id": "a", "response": {"status_code": 200,
     "request_id": "...", "body": {<chat.completion | text_completion | embedding list>}},
     "error": null}
    {"id": "batch_req_...", "custom_id": "a", "response": null,
     "error": {"code": "invalid_request", "message": "..."}}

A line's ``body`` is read exactly as ``tokenhive serve`` reads the same endpoint's body
(``clients/http/openai_requests.parse_body``), and its answer is the body serve would send
(``openai_responses.response_body``): one parser, one answer shape. So fields tokenhive cannot
honour (n > 1, logit_bias, ...) are refused naming the field, not silently ignored; harmless
ones (user, metadata, stream, ...) are ignored; tools and response_format work as in serve.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from tokenhive.clients.http.openai_requests import parse_body
from tokenhive.clients.http.openai_responses import response_body
from tokenhive.clients.result import Result
from tokenhive.schemas.errors import InvalidRequest, TokenHiveError
from tokenhive.schemas.messages import Kind, Priority, Request

URL_KIND = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETION,
    "/v1/embeddings": Kind.EMBEDDING,
}


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
    body_model = body.get("model")
    model = model_for(body_model if isinstance(body_model, str) else None)
    if not model:
        raise InvalidRequest("body.model is missing and no default model is known")
    try:
        parsed = parse_body(kind, {**body, "model": model}, priority=Priority.BATCH,
                            timeout=timeout)
    except InvalidRequest as exc:  # BadField: say which field, as serve's 400 does
        param = getattr(exc, "param", None)
        raise InvalidRequest(f"body.{param}: {exc.message}" if param else exc.message) from None
    parsed.request.stream = False  # a batch answer is collected whole
    return BatchItem(custom_id=custom_id, url=str(url), request=parsed.request,
                     encoding_format=parsed.encoding_format)


def success_line(item: BatchItem, result: Result) -> dict[str, Any]:
    body = response_body(item.request.kind, result, item.request.model,
                         encoding_format=item.encoding_format)
    return {
        "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": result.id, "body": body},
        "error": None,
    }


def error_line(custom_id: str | None, exc: TokenHiveError) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
        "error": {"code": exc.code.value, "message": exc.message},
    }
