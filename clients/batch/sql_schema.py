"""The job store's tables, written once for both databases (``{serial}``, ``{blob}`` and
``{real}`` are the only differences), rows back to API objects, and the dialect interface
each database fills in."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any, Protocol

import msgspec

from tokenhive.clients.batch.objects import BatchErrors, BatchObject, FileObject, RequestCounts

TABLES = (
    """CREATE TABLE IF NOT EXISTS files (
        seq {serial}, id TEXT NOT NULL UNIQUE, purpose TEXT NOT NULL, filename TEXT NOT NULL,
        bytes BIGINT NOT NULL, created_at BIGINT NOT NULL, content {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS batches (
        seq {serial}, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, metadata TEXT,
        errors TEXT, output_file_id TEXT, error_file_id TEXT, created_at BIGINT NOT NULL,
        in_progress_at BIGINT, expires_at BIGINT, finalizing_at BIGINT, completed_at BIGINT,
        failed_at BIGINT, expired_at BIGINT, cancelling_at BIGINT, cancelled_at BIGINT,
        total BIGINT NOT NULL DEFAULT 0, completed BIGINT NOT NULL DEFAULT 0,
        failed BIGINT NOT NULL DEFAULT 0)""",
    # state: pending | done. A pending line with lease_until in the future is being run by
    # lease_owner; output is its OpenAI response line once done.
    """CREATE TABLE IF NOT EXISTS lines (
        batch_id TEXT NOT NULL, idx BIGINT NOT NULL, custom_id TEXT NOT NULL,
        body TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', lease_owner TEXT,
        lease_until {real}, ok INTEGER, output TEXT, PRIMARY KEY (batch_id, idx))""",
    "CREATE INDEX IF NOT EXISTS lines_by_state ON lines (batch_id, state)",
    "CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status)",
)

#: the batch columns, in BatchObject's terms (request counts and JSON fields handled apart)
BATCH_COLUMNS = (
    "id", "status", "endpoint", "input_file_id", "completion_window", "metadata", "errors",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at", "total", "completed", "failed",
)
FILE_COLUMNS = ("id", "purpose", "filename", "bytes", "created_at")


def to_json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


def file_of(row: tuple[Any, ...]) -> FileObject:
    return FileObject(**dict(zip(FILE_COLUMNS, row, strict=True)))


def batch_of(row: tuple[Any, ...]) -> BatchObject:
    fields = dict(zip(BATCH_COLUMNS, row, strict=True))
    counts = RequestCounts(total=fields.pop("total"), completed=fields.pop("completed"),
                           failed=fields.pop("failed"))
    metadata, errors = fields.pop("metadata"), fields.pop("errors")
    return BatchObject(
        **fields, request_counts=counts,
        metadata=json.loads(metadata) if metadata else None,
        errors=msgspec.json.decode(errors, type=BatchErrors) if errors else None,
    )


class Dialect(Protocol):
    """What differs between SQLite and PostgreSQL. Connections are used from one thread."""

    label: str  # for logs and errors; never holds a password

    def connect(self) -> Any: ...

    def sql(self, text: str) -> str:
        """``?`` placeholders in the driver's style."""
        ...

    def transaction(self, conn: Any) -> AbstractContextManager[None]:
        """A write transaction that holds its rows until it ends."""
        ...

    def claim(self, conn: Any, owner: str, now: float, until: float, limit: int
              ) -> list[tuple[str, int, str, str]]:
        """Lease up to ``limit`` pending lines of in-progress batches that no one holds."""
        ...

    def lock_batch(self, conn: Any, batch_id: str) -> str | None:
        """The batch's status, locked until the transaction ends; None if there is none."""
        ...

    def after_open(self, conn: Any) -> None: ...

    def broken(self, conn: Any) -> bool:
        """The connection is lost and must be replaced."""
        ...

    def close(self, conn: Any) -> None: ...
