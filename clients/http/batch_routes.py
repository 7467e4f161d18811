"""The Files and Batches API of ``tokenhive serve``, in OpenAI's shapes, on the job store.

    POST   /v1/files                    multipart upload, purpose "batch" (size capped)
    GET    /v1/files                    ?purpose= &limit= &after=   (newest first)
    GET    /v1/files/{id}               the file object
    GET    /v1/files/{id}/content       its bytes (inputs, and batches' output/error files)
    DELETE /v1/files/{id}
    POST   /v1/batches                  {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches                  ?limit= &after=   (newest first)
    GET    /v1/batches/{id}
    POST   /v1/batches/{id}/cancel

A batch's lines run at batch priority through the same engine as ``tokenhive batch``, in the
background of every server sharing the job store, and survive restarts (``clients/batch``).
Errors have OpenAI's body (``clients/http/errors.py``); a bad field names itself in ``param``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tokenhive.clients.batch.input_file import check_endpoint, split_input
from tokenhive.clients.batch.multipart import parse_form
from tokenhive.clients.batch.objects import (
    BATCH_PURPOSE,
    COMPLETION_WINDOW,
    FileDeleted,
    page_of,
)
from tokenhive.clients.batch.openai_format import URL_KIND
from tokenhive.clients.batch.service import BatchJobs
from tokenhive.clients.http.errors import INVALID, RATE_LIMIT, BadField, HttpProblem

MAX_METADATA_KEYS, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512  # OpenAI's metadata limits
MAX_FILENAME_CHARS = 255

Handler = Callable[[BatchJobs, Request], Awaitable[Response]]


def batch_routes(jobs: BatchJobs) -> list[BaseRoute]:
    def bound(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        return partial(handler, jobs)

    return [
        Route("/v1/files", bound(upload_file), methods=["POST"]),
        Route("/v1/files", bound(list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", bound(get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", bound(delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", bound(file_content), methods=["GET"]),
        Route("/v1/batches", bound(create_batch), methods=["POST"]),
        Route("/v1/batches", bound(list_batches), methods=["GET"]),
        Route("/v1/batches/{batch_id}", bound(get_batch), methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", bound(cancel_batch), methods=["POST"]),
    ]


def json_response(value: Any) -> Response:
    return Response(msgspec.json.encode(value), media_type="application/json")


def not_found(what: str, object_id: str, param: str) -> HttpProblem:
    return HttpProblem(404, f"no such {what}: {object_id!r}", type=INVALID, code="not_found",
                       param=param)


# -- files ------------------------------------------------------------------------------------


async def upload_file(jobs: BatchJobs, request: Request) -> Response:
    body = await request.body()  # capped at --max-file-bytes by the app's BodyLimit
    form = parse_form(request.headers.get("content-type", ""), body)  # InvalidRequest: 400
    purpose = form.get("purpose")
    if purpose is None or purpose.data.decode("utf-8", errors="replace") != BATCH_PURPOSE:
        raise BadField("purpose", f"purpose must be {BATCH_PURPOSE!r} (the only one this "
                       f"server keeps files for)")
    upload = form.get("file")
    if upload is None or upload.filename is None:
        raise BadField("file", "the form has no file part")
    if not upload.data:
        raise BadField("file", "the file is empty")
    stored = (await jobs.store.usage()).stored_bytes
    if stored + len(upload.data) > jobs.max_stored_bytes:
        raise BadField("file", f"the server's file storage is full ({stored} of "
                       f"{jobs.max_stored_bytes} bytes used): delete files first",
                       code="storage_limit_exceeded")
    filename = upload.filename[-MAX_FILENAME_CHARS:] or "upload.jsonl"
    file = await jobs.store.create_file(purpose=BATCH_PURPOSE, filename=filename,
                                        content=upload.data)
    return json_response(file)


async def list_files(jobs: BatchJobs, request: Request) -> Response:
    limit = _limit(request, default=10_000, most=10_000)
    files, more = await jobs.store.list_files(
        purpose=request.query_params.get("purpose"), limit=limit,
        after=request.query_params.get("after"))
    return json_response(page_of(files, more))


async def get_file(jobs: BatchJobs, request: Request) -> Response:
    file_id = request.path_params["file_id"]
    file = await jobs.store.get_file(file_id)
    if file is None:
        raise not_found("file", file_id, "file_id")
    return json_response(file)


async def file_content(jobs: BatchJobs, request: Request) -> Response:
    file_id = request.path_params["file_id"]
    content = await jobs.store.file_content(file_id)
    if content is None:
        raise not_found("file", file_id, "file_id")
    return Response(content, media_type="application/octet-stream")


async def delete_file(jobs: BatchJobs, request: Request) -> Response:
    file_id = request.path_params["file_id"]
    if not await jobs.store.delete_file(file_id):
        raise not_found("file", file_id, "file_id")
    return json_response(FileDeleted(id=file_id))


# -- batches ----------------------------------------------------------------------------------


async def create_batch(jobs: BatchJobs, request: Request) -> Response:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise BadField(None, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadField(None, "the body must be a JSON object")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise BadField("input_file_id", "input_file_id must be a file id")
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or not check_endpoint(endpoint):
        raise BadField("endpoint", f"endpoint must be one of {sorted(URL_KIND)}")
    window = body.get("completion_window")
    if window != COMPLETION_WINDOW:
        raise BadField("completion_window",
                       f"completion_window must be {COMPLETION_WINDOW!r}")
    metadata = _metadata(body.get("metadata"))
    if (await jobs.store.usage()).active_batches >= jobs.max_active_batches:
        raise HttpProblem(429, f"this server already runs {jobs.max_active_batches} batches "
                          f"(the most it takes): wait for one to end",
                          type=RATE_LIMIT, code="too_many_active_batches",
                          headers={"Retry-After": "60"})
    file = await jobs.store.get_file(file_id)
    if file is None:
        raise not_found("file", file_id, "input_file_id")
    if file.purpose != BATCH_PURPOSE:
        raise BadField("input_file_id", f"file {file_id!r} has purpose {file.purpose!r}, "
                       f"not {BATCH_PURPOSE!r}")
    content = await jobs.store.file_content(file_id)
    if content is None:  # deleted in between
        raise not_found("file", file_id, "input_file_id")
    lines, errors = await asyncio.to_thread(split_input, content, endpoint,
                                            max_lines=jobs.max_lines)
    batch = await jobs.store.create_batch(
        input_file_id=file_id, endpoint=endpoint, completion_window=COMPLETION_WINDOW,
        metadata=metadata, lines=lines, errors=errors)
    jobs.service.wake()
    return json_response(batch)


async def list_batches(jobs: BatchJobs, request: Request) -> Response:
    limit = _limit(request, default=20, most=100)
    batches, more = await jobs.store.list_batches(limit=limit,
                                                  after=request.query_params.get("after"))
    return json_response(page_of(batches, more))


async def get_batch(jobs: BatchJobs, request: Request) -> Response:
    batch_id = request.path_params["batch_id"]
    batch = await jobs.store.get_batch(batch_id)
    if batch is None:
        raise not_found("batch", batch_id, "batch_id")
    return json_response(batch)


async def cancel_batch(jobs: BatchJobs, request: Request) -> Response:
    batch_id = request.path_params["batch_id"]
    batch = await jobs.store.cancel_batch(batch_id)  # InvalidRequest if it already ended
    if batch is None:
        raise not_found("batch", batch_id, "batch_id")
    jobs.service.wake()
    return json_response(batch)


# -- fields -----------------------------------------------------------------------------------


def _limit(request: Request, *, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise BadField("limit", f"limit must be an integer from 1 to {most}")
    return int(raw)


def _metadata(raw: object) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) > MAX_METADATA_KEYS:
        raise BadField("metadata", f"metadata must be an object of at most "
                       f"{MAX_METADATA_KEYS} string values")
    for key, value in raw.items():
        if len(key) > MAX_KEY_CHARS or not isinstance(value, str) \
                or len(value) > MAX_VALUE_CHARS:
            raise BadField(f"metadata.{key[:MAX_KEY_CHARS]}",
                           f"metadata keys are at most {MAX_KEY_CHARS} characters and values "
                           f"strings of at most {MAX_VALUE_CHARS}")
    return dict(raw)
