"""The Files/Batches API's part of ``tokenhive serve``: its flags, and the job store and
service that run beside the HTTP server for as long as it runs.

    add_batch_arguments(parser)
    ...
    async with batch_jobs(args, client, target.models) as jobs:
        app = build_app(ctx, extra_routes=batch_routes(jobs), body_limits=jobs.body_limits)

Jobs live in ``--data-dir`` (SQLite, default ``$XDG_DATA_HOME/tokenhive`` or
``~/.local/share/tokenhive``) or in the PostgreSQL database of ``--jobs-db`` /
``$TOKENHIVE_JOBS_DB`` (shared by several servers). A restarted server resumes its batches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.batch.job_service import JobService, model_chooser
from tokenhive.clients.batch.store import JobStore, open_store
from tokenhive.schemas.config import ConfigError

JOBS_DB_ENV = "TOKENHIVE_JOBS_DB"
DEFAULT_MAX_FILE_BYTES = 100 * 2**20
DEFAULT_MAX_LINES = 50_000  # requests per batch, as OpenAI's
DEFAULT_MAX_STORED_BYTES = 20 * 2**30
DEFAULT_MAX_ACTIVE_BATCHES = 100
FILES_PREFIX = "/v1/files"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokenhive"


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Files and Batches API")
    group.add_argument("--data-dir", type=Path, metavar="DIR",
                       help="where batch jobs and files are kept (SQLite); default "
                            "$XDG_DATA_HOME/tokenhive or ~/.local/share/tokenhive")
    group.add_argument("--jobs-db", metavar="URL",
                       help=f"share jobs with other servers in this PostgreSQL database "
                            f"(postgresql://user@host/db; the password from PGPASSWORD or "
                            f"~/.pgpass, or the whole URL from ${JOBS_DB_ENV})")
    group.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                       metavar="N", help="larger uploads get 413 (default 100 MiB)")
    group.add_argument("--max-batch-lines", type=int, default=DEFAULT_MAX_LINES, metavar="N",
                       help=f"requests per batch (default {DEFAULT_MAX_LINES})")
    group.add_argument("--max-stored-bytes", type=int, default=DEFAULT_MAX_STORED_BYTES,
                       metavar="N", help="all files kept together (uploads and outputs); an "
                                         "upload past it is refused (default 20 GiB)")
    group.add_argument("--max-active-batches", type=int, default=DEFAULT_MAX_ACTIVE_BATCHES,
                       metavar="N", help=f"batches not yet ended; more are refused with 429 "
                                         f"(default {DEFAULT_MAX_ACTIVE_BATCHES})")
    group.add_argument("--batch-concurrency", type=int, default=16, metavar="N",
                       help="batch requests this server runs at once (default 16)")
    group.add_argument("--batch-lease", type=float, default=30.0, metavar="S",
                       help="a shared store gives a dead server's lines to another after "
                            "this long (default 30)")


def jobs_db_url(args: argparse.Namespace) -> str | None:
    """``--jobs-db`` (never with a password: argv is world-readable), else the env var."""
    url: str | None = args.jobs_db
    if url:
        if urlsplit(url).password is not None:
            raise ConfigError(f"--jobs-db must not hold a password (argv is visible to every "
                              f"user): use PGPASSWORD, ~/.pgpass or ${JOBS_DB_ENV}")
        return url
    return os.environ.get(JOBS_DB_ENV) or None


@dataclass
class BatchJobs:
    """What the Files/Batches routes need."""

    store: JobStore
    service: JobService
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_lines: int = DEFAULT_MAX_LINES
    max_stored_bytes: int = DEFAULT_MAX_STORED_BYTES
    max_active_batches: int = DEFAULT_MAX_ACTIVE_BATCHES

    @property
    def body_limits(self) -> dict[str, int]:
        return {FILES_PREFIX: self.max_file_bytes}


@contextlib.asynccontextmanager
async def batch_jobs(args: argparse.Namespace, client: AsyncClient,
                     local_models: Sequence[str] = ()) -> AsyncIterator[BatchJobs | None]:
    """Open the job store and run the job service in the background until the block ends.

    Yields None (no Files/Batches API, with a warning) when the *default* data directory
    cannot be used (another server owns it, it cannot be created), so several stateless
    servers can still run on one host; a ``--data-dir`` or ``--jobs-db`` that cannot be
    used is a ConfigError."""
    for flag, value in (("--max-file-bytes", args.max_file_bytes),
                        ("--max-batch-lines", args.max_batch_lines),
                        ("--max-stored-bytes", args.max_stored_bytes),
                        ("--max-active-batches", args.max_active_batches),
                        ("--batch-concurrency", args.batch_concurrency),
                        ("--batch-lease", args.batch_lease)):
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0")
    url = jobs_db_url(args)
    try:
        store = await open_store(data_dir=args.data_dir or default_data_dir(), url=url)
    except ConfigError as exc:  # the default place is taken or unusable: serve without it
        if args.data_dir or url:
            raise
        print(f"tokenhive serve: warning: Files and Batches API off: {exc}", file=sys.stderr)
        yield None
        return
    service = JobService(store, client, concurrency=args.batch_concurrency,
                         lease_s=args.batch_lease, model_for=model_chooser(local_models))
    try:
        async with running(service):
            yield BatchJobs(store, service, max_file_bytes=args.max_file_bytes,
                            max_lines=args.max_batch_lines,
                            max_stored_bytes=args.max_stored_bytes,
                            max_active_batches=args.max_active_batches)
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def running(service: JobService) -> AsyncIterator[JobService]:
    """The service's loop as a background task; on exit it is stopped (its lines in flight
    cancelled and their leases given back) and awaited."""
    task = asyncio.create_task(service.run(), name="batch-jobs")
    try:
        yield service
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
