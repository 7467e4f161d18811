"""A cap on request body size, enforced at the door for every route.

A declared ``Content-Length`` over the cap is refused with 413 before a byte of the body is
read; a body without one (chunked) is counted as it arrives and refused the moment it passes
the cap, so nobody can make the server buffer an unbounded body. Routes that take larger
bodies (file uploads) get their own cap by path prefix (``per_prefix``).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenhive.clients.http.errors import INVALID, HttpProblem, openai_error

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


def too_large(limit: int) -> HttpProblem:
    return HttpProblem(413, f"request body is larger than the limit of {limit} bytes",
                       type=INVALID, code="request_too_large")


class BodyLimit:
    """ASGI middleware. A route reading past the cap gets ``HttpProblem(413)`` from
    ``receive``, which the app's exception handler answers."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 per_prefix: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # longest prefix first, so /v1/files/x picks /v1/files over /v1
        self.per_prefix = sorted((per_prefix or {}).items(), key=lambda kv: -len(kv[0]))

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.per_prefix:
            if path.startswith(prefix):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    status, message = ((413, too_large(limit).message) if value.isdigit()
                                       else (400, "Content-Length is not a number"))
                    response = openai_error(status, message, type=INVALID,
                                            code="request_too_large" if status == 413
                                            else "invalid_request")
                    await response(scope, receive, send)
                    return
                break
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counting_receive, send)
