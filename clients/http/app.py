"""``build_app``: the Starlette application of ``tokenhive serve``.

    app = build_app(ServeContext(client), api_keys=keys, max_body_bytes=8 << 20,
                    extra_routes=batch_routes(jobs), on_startup=[jobs.start],
                    on_shutdown=[jobs.stop])

Middleware, outermost first: bearer-key auth (when keys are given), the body-size cap, then
Starlette's routing. Every error, the router's own 404/405 included, has OpenAI's shape.
Extra routes (the Files/Batches API) and startup/shutdown hooks plug in through the
arguments; hooks run in order at startup and in reverse order at shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tokenhive.clients.http import completions, pool_routes
from tokenhive.clients.http.auth import BearerAuth
from tokenhive.clients.http.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimit
from tokenhive.clients.http.context import ServeContext
from tokenhive.clients.http.errors import (
    INVALID,
    NOT_FOUND,
    SERVER,
    HttpProblem,
    from_exception,
    from_problem,
    openai_error,
)
from tokenhive.clients.http.sse_response import SseResponse
from tokenhive.schemas.errors import TokenHiveError
from tokenhive.schemas.messages import Kind

log = logging.getLogger("tokenhive.serve")

Hook = Callable[[], Awaitable[None]]
Handler = Callable[[ServeContext, HttpRequest], Awaitable[Response]]


def api_routes(ctx: ServeContext) -> list[BaseRoute]:
    def bound(handler: Handler) -> Callable[[HttpRequest], Awaitable[Response]]:
        return partial(handler, ctx)

    def generation(kind: Kind) -> Callable[[HttpRequest], Awaitable[Response | SseResponse]]:
        return partial(completions.handle, ctx, kind=kind)

    return [
        Route("/v1/chat/completions", generation(Kind.CHAT), methods=["POST"]),
        Route("/v1/completions", generation(Kind.COMPLETION), methods=["POST"]),
        Route("/v1/embeddings", generation(Kind.EMBEDDING), methods=["POST"]),
        Route("/v1/models", bound(pool_routes.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", bound(pool_routes.get_model), methods=["GET"]),
        Route("/health", bound(pool_routes.health), methods=["GET"]),
        Route("/metrics", bound(pool_routes.metrics), methods=["GET"]),
    ]


def build_app(
    ctx: ServeContext,
    *,
    api_keys: Sequence[bytes] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_limits: Mapping[str, int] | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    on_startup: Sequence[Hook] = (),
    on_shutdown: Sequence[Hook] = (),
) -> Starlette:
    """``body_limits`` maps a path prefix to its own body cap (uploads)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for hook in on_startup:
            await hook()
        try:
            yield
        finally:
            for hook in reversed(on_shutdown):
                try:
                    await hook()
                except Exception:  # one failing hook must not skip the others
                    log.exception("shutdown hook failed")

    middleware = [Middleware(BodyLimit, max_bytes=max_body_bytes, per_prefix=body_limits)]
    if api_keys:
        middleware.insert(0, Middleware(BearerAuth, keys=list(api_keys)))
    app = Starlette(
        routes=[*api_routes(ctx), *extra_routes],
        middleware=middleware,
        exception_handlers={
            HTTPException: _http_exception,
            HttpProblem: _problem,
            TokenHiveError: _tokenhive_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.serve = ctx
    return app


async def _http_exception(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return openai_error(404, f"no route {request.method} {request.url.path}",
                            type=NOT_FOUND, code="unknown_url")
    if exc.status_code == 405:
        return openai_error(405, f"method {request.method} is not allowed on "
                            f"{request.url.path}", type=INVALID, code="method_not_allowed",
                            headers=dict(exc.headers or {}))
    return openai_error(exc.status_code, str(exc.detail), type=INVALID,
                        headers=dict(exc.headers or {}))


async def _problem(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, HttpProblem)
    return from_problem(exc)


async def _tokenhive_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, TokenHiveError)
    return from_exception(exc)


async def _unexpected(request: HttpRequest, exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc, extra={"path": request.url.path})
    return openai_error(500, "internal server error", type=SERVER, code="internal_error")
