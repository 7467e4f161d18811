"""Routes that describe the live pool: ``/v1/models``, ``/health``, ``/metrics``.

All three ask the broker for its status on each call (a ZeroMQ round trip, well under a
millisecond on one host); a model is listed while at least one of its workers is serving
(health ok or degraded), and a model group while one of its members is; a serving worker
is also what ``/health`` requires for a 200.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from tokenhive.clients.http.completions import json_response
from tokenhive.clients.http.context import ServeContext
from tokenhive.clients.http.errors import INVALID, from_exception, openai_error
from tokenhive.clients.http.metrics import SERVING
from tokenhive.schemas.errors import TokenHiveError
from tokenhive.schemas.messages import StatusReply

OWNER = "tokenhive"


def serving_models(status: StatusReply) -> list[str]:
    """Models with a serving worker, and model groups with a serving member (a request for
    a group goes to one of its members)."""
    models = {w.model for w in status.workers if w.health in SERVING}
    groups = {g for g, members in status.groups.items() if models.intersection(members)}
    return sorted(models | groups)


def model_object(model: str, created: int) -> dict[str, object]:
    return {"id": model, "object": "model", "created": created, "owned_by": OWNER}


def _created(status: StatusReply) -> int:
    return int(time.time() - status.uptime_s)  # when the broker started


async def list_models(ctx: ServeContext, http: HttpRequest) -> Response:
    try:
        status = await ctx.client.status(timeout=ctx.status_timeout)
    except TokenHiveError as exc:
        return from_exception(exc)
    created = _created(status)
    return json_response({"object": "list",
                          "data": [model_object(m, created) for m in serving_models(status)]})


async def get_model(ctx: ServeContext, http: HttpRequest) -> Response:
    model = http.path_params["model"]
    try:
        status = await ctx.client.status(timeout=ctx.status_timeout)
    except TokenHiveError as exc:
        return from_exception(exc)
    if model not in serving_models(status):
        return openai_error(404, f"The model {model!r} does not exist or no worker serves it",
                            type=INVALID, code="model_not_found", param="model")
    return json_response(model_object(model, _created(status)))


async def health(ctx: ServeContext, http: HttpRequest) -> Response:
    try:
        status = await ctx.client.status(timeout=ctx.status_timeout)
    except TokenHiveError as exc:
        return json_response({"status": "unavailable", "reason": exc.message}, 503)
    healthy = [w for w in status.workers if w.health in SERVING]
    body = {"status": "ok" if healthy else "unavailable", "healthy_workers": len(healthy),
            "workers": len(status.workers), "models": serving_models(status)}
    return json_response(body, 200 if healthy else 503)


async def metrics(ctx: ServeContext, http: HttpRequest) -> Response:
    try:
        status: StatusReply | None = await ctx.client.status(timeout=ctx.status_timeout)
    except TokenHiveError:
        status = None  # tokenhive_pool_up 0; this server's own figures still count
    return Response(ctx.metrics.render(status), media_type=CONTENT_TYPE_LATEST)
